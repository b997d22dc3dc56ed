"""Command-line entry points of this package (registered by dsv4.cli.build_parser):
`dsv4 sft`, `dsv4 grpo`, `dsv4 distill` and the whole recipe, `dsv4 posttrain`.

The options that set a stage config dataclass (SFTConfig, GRPOConfig, DistillConfig,
PosttrainConfig) are made from its fields (dsv4.options), with their defaults and help; options
left out keep them. Those modules import torch, so a command adds them only when it is parsed
(CommandParser.defer): `dsv4 --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from dsv4.commands import CommandError, add_chat_encoding_argument, positive_int
from dsv4.options import add_dataclass_options, dataclass_from_args

DOMAIN_MODULE_HELP = ("a Python file defining dsv4.tasks.Domain objects (e.g. "
                      "FunctionDomain('mine', generate, check)); each is registered under its "
                      "name and usable wherever a domain name is")


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    _add_sft(subparsers)
    _add_grpo(subparsers)
    _add_distill(subparsers)
    _add_posttrain(subparsers)


# ---- shared options --------------------------------------------------------------------------
# Each stage command exposes these fields of its config dataclass (SFTConfig, GRPOConfig,
# DistillConfig), besides its own; their defaults and help are the fields' own.
SFT_FIELDS = ("steps", "lr", "batch_size", "seq_len", "optimizer", "thinking", "bf16",
              "seed", "progress")
GRPO_FIELDS = ("steps", "lr", "group_size", "prompts_per_step", "temperature", "top_k",
               "top_p", "clip_eps", "kl_beta", "max_tokens", "seed", "progress")
DISTILL_FIELDS = ("steps", "lr", "prompts_per_domain", "temperature", "seed", "progress")
SFT_RENAME = {"thinking": "--think", "bf16": "--fp32"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain-module", metavar="FILE", action="append", default=[],
                        help=DOMAIN_MODULE_HELP)
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for torch (default: every core this process may use)")


def _load_domain_modules(paths: list[str]) -> None:
    from dsv4.tasks import load_domain_module

    for path in paths:
        try:
            load_domain_module(path)
        except ValueError as err:
            raise CommandError(str(err)) from None


def _domain(name: str):
    from dsv4.tasks import get_domain

    try:
        return get_domain(name)
    except ValueError as err:
        raise CommandError(str(err)) from None


def _prepare(args: argparse.Namespace) -> None:
    from dsv4.runtime import set_threads

    set_threads(args.threads, all_cores=True)
    _load_domain_modules(args.domain_module)


def _load(path: str):
    """(model, tokenizer) of a run directory or checkpoint folder (imports torch)."""
    from dsv4.posttrain.common import load_model_and_tokenizer

    return load_model_and_tokenizer(path)


def _check_out(out: str) -> Path:
    from dsv4.posttrain.common import STAGE_NAME

    target = Path(out)
    if (target / STAGE_NAME).is_file() or (target / "checkpoints" / "latest").is_file():
        raise CommandError(f"--out {target} already holds a run; choose another directory")
    return target


def _report_accuracy(model, tokenizer, domains: list, eval_size: int, label: str) -> dict:
    from dsv4.posttrain.common import domain_accuracy

    accs = {}
    for domain in domains:
        accs[domain.name] = domain_accuracy(model, tokenizer, domain, domain.eval_set(eval_size))
        print(f"{label}: {domain.name} held-out accuracy {accs[domain.name]:.3f} "
              f"(n={eval_size})")
    return accs


# ---- dsv4 sft ------------------------------------------------------------------------------
def _add_sft(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)",
        description="Fine-tune a model on conversations (OpenAI-format messages) rendered with "
                    "the V4 chat encoding; the loss covers exactly what the assistant "
                    "generates (its text and EOS). Conversations are packed into rows without "
                    "attending to each other. Data: --data FILE.jsonl (one {\"messages\": "
                    "[...]} per line) and/or --domains NAME ... (procedural problems, the "
                    "answer as the assistant turn). The output is a run directory with a "
                    "checkpoint, the tokenizer and metrics.jsonl (dsv4 generate --run OUT).")
    parser.add_argument("--from", dest="source", required=True, metavar="RUN",
                        help="the model to start from: a run directory or checkpoint folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="new run directory")
    parser.add_argument("--data", nargs="+", metavar="FILE", default=[],
                        help="JSONL chat files: {\"messages\": [{\"role\": ..., \"content\": "
                             "...}, ...]} per line")
    parser.add_argument("--domains", nargs="+", metavar="NAME", default=[],
                        help="also train on these domains' procedural problems")
    parser.add_argument("--problems", type=positive_int, metavar="N", default=2000,
                        help="problems per --domains domain (default 2000)")
    add_chat_encoding_argument(parser)
    _common(parser)
    parser.defer(_add_sft_config_options)
    parser.set_defaults(run=cmd_sft)


def _add_sft_config_options(parser: argparse.ArgumentParser) -> None:
    from dsv4.posttrain.sft import SFTConfig

    add_dataclass_options(parser, SFTConfig(), SFT_FIELDS, rename=SFT_RENAME)


def cmd_sft(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import save_stage
    from dsv4.posttrain.sft import SFTConfig, domain_chats, load_chat_jsonl, run_sft

    _prepare(args)
    if not args.data and not args.domains:
        raise CommandError("give training data: --data FILE.jsonl and/or --domains NAME ...")
    out = _check_out(args.out)
    domains = [_domain(name) for name in args.domains]
    cfg = dataclass_from_args(SFTConfig(), args, (*SFT_FIELDS, "chat_encoding"),
                              rename=SFT_RENAME)
    chats = [chat for path in args.data for chat in load_chat_jsonl(path)]
    generated, generated_thinking = domain_chats(domains, args.problems, cfg.seed)
    thinking = [cfg.thinking] * len(chats) + generated_thinking
    chats += generated
    model, tokenizer = _load(args.source)
    summary = run_sft(model, tokenizer, chats, cfg, out=out, thinking=thinking)
    save_stage(model, out, tokenizer, cfg.steps, dict(stage="sft", source=args.source,
                                                      **summary, config=dataclasses.asdict(cfg)))
    print(f"sft: {summary['examples']} conversations, final loss {summary['final_loss']:.3f}; "
          f"saved {out} (dsv4 chat --run {out})")
    if domains:
        _report_accuracy(model, tokenizer, domains, 100, "sft")
    return 0


# ---- dsv4 grpo -----------------------------------------------------------------------------
def _add_grpo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "grpo", help="GRPO on a verifiable domain (a specialist)",
        description="Reinforcement learning with GRPO (V4 report, post-training): groups of "
                    "samples per prompt from the inference engine, 0/1 rewards from the domain's "
                    "checker, group-normalized advantages, clipped ratio to the engine's own "
                    "sampling log-probs, unbiased KL to a frozen reference, off-policy sequence "
                    "masking, Keep Routing and Keep Sampling Mask. Prints held-out accuracy "
                    "before and after.")
    parser.add_argument("--from", dest="source", required=True, metavar="RUN",
                        help="the policy to start from (usually an SFT run)")
    parser.add_argument("--domain", required=True, metavar="NAME",
                        help="the domain whose prompts and checker to use (built-ins: sum, "
                             "sort, expr; or one from --domain-module)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new run directory")
    parser.add_argument("--ref", metavar="RUN",
                        help="the KL reference model (default: the --from model)")
    parser.add_argument("--eval-size", type=int, default=200, metavar="N",
                        help="held-out problems for the before/after accuracy, 0 = skip "
                             "(default 200)")
    _common(parser)
    parser.defer(_add_grpo_config_options)
    parser.set_defaults(run=cmd_grpo)


def _add_grpo_config_options(parser: argparse.ArgumentParser) -> None:
    from dsv4.posttrain.grpo import GRPOConfig

    add_dataclass_options(parser, GRPOConfig(), GRPO_FIELDS)


def cmd_grpo(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import save_stage
    from dsv4.posttrain.grpo import GRPOConfig, run_grpo

    _prepare(args)
    domain = _domain(args.domain)
    out = _check_out(args.out)
    cfg = dataclass_from_args(GRPOConfig(), args, GRPO_FIELDS)
    model, tokenizer = _load(args.source)
    reference, _ = _load(args.ref or args.source)
    if args.eval_size:
        _report_accuracy(model, tokenizer, [domain], args.eval_size, "before")
    try:
        summary = run_grpo(model, reference, tokenizer, domain, cfg, out=out)
    except ValueError as err:  # not all are dsv4.Error yet (e.g. the engine's checks)
        raise CommandError(str(err)) from None
    save_stage(model, out, tokenizer, cfg.steps, dict(stage="grpo", source=args.source,
                                                      domain=domain.name, **summary,
                                                      config=dataclasses.asdict(cfg)))
    print(f"grpo {domain.name}: mean reward {summary['reward_first_quarter']:.3f} (first "
          f"quarter) -> {summary['reward_last_quarter']:.3f} (last); saved {out}")
    if args.eval_size:
        _report_accuracy(model, tokenizer, [domain], args.eval_size, "after")
    return 0


# ---- dsv4 distill --------------------------------------------------------------------------
def _teacher(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DOMAIN=RUN, e.g. sum=runs/pt/"
                                         "specialist-sum")
    return name, path


def _add_distill(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "distill", help="on-policy distillation of several teachers into one student",
        description="Multi-teacher on-policy distillation (V4 report, post-training): the student "
                    "samples each domain's prompts; the loss is the exact full-vocabulary "
                    "reverse KL(student || that domain's teacher) at every student-generated "
                    "position.")
    parser.add_argument("--student", required=True, metavar="RUN", help="the starting student")
    parser.add_argument("--teacher", required=True, action="append", type=_teacher,
                        metavar="DOMAIN=RUN", help="a teacher and the domain whose prompts it "
                        "teaches on; repeat for each domain")
    parser.add_argument("--out", required=True, metavar="DIR", help="new run directory")
    parser.add_argument("--eval-size", type=int, default=200, metavar="N",
                        help="held-out problems per domain for the final accuracy, 0 = skip "
                             "(default 200)")
    _common(parser)
    parser.defer(_add_distill_config_options)
    parser.set_defaults(run=cmd_distill)


def _add_distill_config_options(parser: argparse.ArgumentParser) -> None:
    from dsv4.posttrain.distill import DistillConfig

    add_dataclass_options(parser, DistillConfig(), DISTILL_FIELDS)


def cmd_distill(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import save_stage
    from dsv4.posttrain.distill import DistillConfig, run_distill

    _prepare(args)
    teachers_given = dict(args.teacher)
    if len(teachers_given) != len(args.teacher):
        raise CommandError("--teacher: one teacher per domain (a domain was given twice)")
    domains = {name: _domain(name) for name in teachers_given}
    out = _check_out(args.out)
    cfg = dataclass_from_args(DistillConfig(), args, DISTILL_FIELDS)
    student, tokenizer = _load(args.student)
    teachers = {name: _load(path)[0] for name, path in teachers_given.items()}
    summary = run_distill(student, teachers, tokenizer, domains, cfg, out=out)
    save_stage(student, out, tokenizer, cfg.steps,
               dict(stage="distill", source=args.student, teachers=teachers_given, **summary,
                    config=dataclasses.asdict(cfg)))
    print(f"distill: final mean reverse KL {summary['final_kl']:.4f}; saved {out}")
    if args.eval_size:
        _report_accuracy(student, tokenizer, list(domains.values()), args.eval_size, "student")
    return 0


# ---- dsv4 posttrain ------------------------------------------------------------------------
def _add_posttrain(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "posttrain", help="the V4 post-training recipe: specialists (SFT, GRPO), then one "
                          "student by on-policy distillation (~30 min on 2 CPU cores at nano)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The paper's two-stage recipe on verifiable domains:\n"
                    "  base = SFT on a mix of all domains\n"
                    "  per domain: sft-D = SFT of base on D; specialist-D = GRPO of sft-D on D\n"
                    "  student = on-policy distillation of base from every specialist\n"
                    "then greedy held-out accuracy of each model -> OUT/results.json and "
                    "OUT/accuracy.png.\nEvery stage is a run directory under OUT (dsv4 chat "
                    "--run OUT/student); finished stages are skipped on a rerun. Without "
                    "--from, a fresh nano model is pretrained first (--pretrain-steps, ~6 min "
                    "at the default 100). From a nano run the default schedule took 42 "
                    "minutes on 2 shared, busy CPU cores (--threads 1; use it when other work "
                    "runs on the machine).")
    _common(parser)
    parser.defer(_add_posttrain_config_options)
    parser.set_defaults(run=cmd_posttrain)


# The PosttrainConfig fields `dsv4 posttrain` exposes, and per nested stage config the fields it
# exposes under other names (one --batch-size sets both SFT stages).
POSTTRAIN_FIELDS = ("from_run", "out", "domains", "pretrain_steps", "sft_problems", "eval_size",
                    "seed", "progress")
POSTTRAIN_RENAME = {"from_run": "--from"}
STAGE_OPTIONS = {
    "base_sft": ({"steps": "--sft-steps", "batch_size": "--batch-size"},
                 {"steps": "base SFT steps", "batch_size": "SFT conversations per step"}),
    "specialist_sft": ({"steps": "--specialist-sft-steps"}, {"steps": "per-domain SFT steps"}),
    "grpo": ({"steps": "--grpo-steps", "group_size": "--group-size",
              "prompts_per_step": "--prompts-per-step"},
             {"steps": "GRPO steps per specialist", "group_size": "GRPO samples per prompt",
              "prompts_per_step": "GRPO prompts per step"}),
    "distill": ({"steps": "--distill-steps", "prompts_per_domain": "--prompts-per-domain"},
                {"steps": "distillation steps",
                 "prompts_per_domain": "distillation samples per domain per step"}),
}
SHARED_STAGE_OPTIONS = {"specialist_sft": {"batch_size": "--batch-size"}}  # read, not added


def _add_posttrain_config_options(parser: argparse.ArgumentParser) -> None:
    from dsv4.posttrain.pipeline import PosttrainConfig

    defaults = PosttrainConfig()
    add_dataclass_options(parser, defaults, POSTTRAIN_FIELDS, rename=POSTTRAIN_RENAME)
    for stage, (rename, helps) in STAGE_OPTIONS.items():
        add_dataclass_options(parser, getattr(defaults, stage), rename, rename=rename,
                              helps=helps)


def posttrain_config(args: argparse.Namespace):
    """The PosttrainConfig of `dsv4 posttrain ...`: the options given, the defaults for the
    rest (the nested stage configs' own, e.g. 200 base SFT steps)."""
    from dsv4.posttrain.pipeline import PosttrainConfig

    cfg = dataclass_from_args(PosttrainConfig(), args, (*POSTTRAIN_FIELDS, "threads"),
                              rename=POSTTRAIN_RENAME)  # --threads: shared with the stages
    for stage, (rename, _) in STAGE_OPTIONS.items():
        rename = {**rename, **SHARED_STAGE_OPTIONS.get(stage, {})}
        setattr(cfg, stage, dataclass_from_args(getattr(cfg, stage), args, rename, rename=rename))
    return cfg


def cmd_posttrain(args: argparse.Namespace) -> int:
    from dsv4.posttrain.pipeline import run_posttrain

    _prepare(args)
    cfg = posttrain_config(args)
    for name in cfg.domains or []:
        _domain(name)
    if cfg.from_run is not None:
        _load(cfg.from_run)  # fail fast on a bad --from, before any work
    run_posttrain(cfg)
    return 0
