"""Command-line entry points of this package (registered by dsv4.cli.build_parser):
`dsv4 sft`, `dsv4 grpo`, `dsv4 distill` and the whole recipe, `dsv4 posttrain`.

Defaults live in the stage config dataclasses (SFTConfig, GRPOConfig, DistillConfig,
PosttrainConfig); options left out keep them. torch is imported inside the commands only, so
`dsv4 --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from dsv4.commands import CommandError, add_chat_encoding_argument, positive_int

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
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain-module", metavar="FILE", action="append", default=[],
                        help=DOMAIN_MODULE_HELP)
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for torch (default: every core this process may use)")
    parser.add_argument("--seed", type=int, help="sampling and data order (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _stage_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}steps", type=positive_int, metavar="N",
                        help="optimizer steps")
    parser.add_argument(f"--{prefix}lr", type=float, metavar="LR", help="peak learning rate")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


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


def _given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """{config field: value} for the options the user gave (mapping: field -> args attr)."""
    return {field: getattr(args, attr) for field, attr in mapping.items()
            if getattr(args, attr, None) is not None}


def _prepare(args: argparse.Namespace) -> None:
    from dsv4.runtime import set_threads

    set_threads(args.threads, all_cores=True)
    _load_domain_modules(args.domain_module)


def _load(path: str):
    from dsv4.posttrain.common import PosttrainError, load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(path)
    except PosttrainError as err:
        raise CommandError(str(err)) from None


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
    _stage_options(parser)
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="conversations per step (default 32)")
    parser.add_argument("--seq-len", type=positive_int, metavar="N",
                        help="packed row length in tokens (default 256)")
    parser.add_argument("--optimizer", choices=("muon", "adamw"), help="default muon")
    parser.add_argument("--think", action="store_true",
                        help="encode the --data conversations in think mode "
                             "(<think>reasoning</think>answer; reasoning_content of assistant "
                             "messages is trained); --domains use their own mode (expr: think)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    add_chat_encoding_argument(parser)
    _common(parser)
    parser.set_defaults(run=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import PosttrainError, save_stage
    from dsv4.posttrain.sft import SFTConfig, domain_chats, load_chat_jsonl, run_sft

    _prepare(args)
    if not args.data and not args.domains:
        raise CommandError("give training data: --data FILE.jsonl and/or --domains NAME ...")
    out = _check_out(args.out)
    domains = [_domain(name) for name in args.domains]
    try:
        chats = [chat for path in args.data for chat in load_chat_jsonl(path)]
    except PosttrainError as err:
        raise CommandError(str(err)) from None
    generated, generated_thinking = domain_chats(domains, args.problems, args.seed or 0)
    thinking = [args.think] * len(chats) + generated_thinking
    chats += generated
    cfg = SFTConfig(**_given(args, dict(steps="steps", lr="lr", batch_size="batch_size",
                                        seq_len="seq_len", optimizer="optimizer", seed="seed")),
                    thinking=args.think, chat_encoding=args.chat_encoding, bf16=not args.fp32,
                    progress=not args.no_progress)
    model, tokenizer = _load(args.source)
    try:
        summary = run_sft(model, tokenizer, chats, cfg, out=out, thinking=thinking)
    except PosttrainError as err:
        raise CommandError(str(err)) from None
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
    _stage_options(parser)
    parser.add_argument("--group-size", type=positive_int, metavar="G",
                        help="samples per prompt (default 8)")
    parser.add_argument("--prompts-per-step", type=positive_int, metavar="Q",
                        help="prompts per step (default 128)")
    parser.add_argument("--temperature", type=_positive_float, help="rollout temperature "
                        "(default 0.7)")
    parser.add_argument("--top-k", type=int, help="rollout top-k, 0 = off (default 0)")
    parser.add_argument("--top-p", type=_positive_float, help="rollout top-p (default 1.0)")
    parser.add_argument("--clip-eps", type=_positive_float, help="ratio clip ε (default 0.2)")
    parser.add_argument("--kl-beta", type=float, help="KL weight β (default 0.01)")
    parser.add_argument("--max-tokens", type=positive_int, help="tokens per sample (default 24)")
    parser.add_argument("--eval-size", type=int, default=200, metavar="N",
                        help="held-out problems for the before/after accuracy, 0 = skip "
                             "(default 200)")
    _common(parser)
    parser.set_defaults(run=cmd_grpo)


def cmd_grpo(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import PosttrainError, save_stage
    from dsv4.posttrain.grpo import GRPOConfig, run_grpo

    _prepare(args)
    domain = _domain(args.domain)
    out = _check_out(args.out)
    cfg = GRPOConfig(**_given(args, dict(
        steps="steps", lr="lr", group_size="group_size", prompts_per_step="prompts_per_step",
        temperature="temperature", top_k="top_k", top_p="top_p", clip_eps="clip_eps",
        kl_beta="kl_beta", max_tokens="max_tokens", seed="seed")),
        progress=not args.no_progress)
    model, tokenizer = _load(args.source)
    reference, _ = _load(args.ref or args.source)
    if args.eval_size:
        _report_accuracy(model, tokenizer, [domain], args.eval_size, "before")
    try:
        summary = run_grpo(model, reference, tokenizer, domain, cfg, out=out)
    except (PosttrainError, ValueError) as err:
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
    _stage_options(parser)
    parser.add_argument("--prompts-per-domain", type=positive_int, metavar="N",
                        help="student samples per domain per step (default 24)")
    parser.add_argument("--temperature", type=_positive_float,
                        help="student sampling temperature (default 1.0)")
    parser.add_argument("--eval-size", type=int, default=200, metavar="N",
                        help="held-out problems per domain for the final accuracy, 0 = skip "
                             "(default 200)")
    _common(parser)
    parser.set_defaults(run=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import PosttrainError, save_stage
    from dsv4.posttrain.distill import DistillConfig, run_distill

    _prepare(args)
    teachers_given = dict(args.teacher)
    if len(teachers_given) != len(args.teacher):
        raise CommandError("--teacher: one teacher per domain (a domain was given twice)")
    domains = {name: _domain(name) for name in teachers_given}
    out = _check_out(args.out)
    cfg = DistillConfig(**_given(args, dict(steps="steps", lr="lr", seed="seed",
                                            prompts_per_domain="prompts_per_domain",
                                            temperature="temperature")),
                        progress=not args.no_progress)
    student, tokenizer = _load(args.student)
    teachers = {name: _load(path)[0] for name, path in teachers_given.items()}
    try:
        summary = run_distill(student, teachers, tokenizer, domains, cfg, out=out)
    except PosttrainError as err:
        raise CommandError(str(err)) from None
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
    parser.add_argument("--from", dest="source", metavar="RUN",
                        help="pretrained run or checkpoint (default: pretrain a fresh nano)")
    parser.add_argument("--out", default="runs/posttrain", metavar="DIR",
                        help="output directory (default runs/posttrain)")
    parser.add_argument("--domains", nargs="+", metavar="NAME",
                        help="domains to post-train (default: sum sort expr and any from "
                             "--domain-module)")
    parser.add_argument("--pretrain-steps", type=positive_int, metavar="N",
                        help="steps of the fresh nano pretraining without --from (default 100)")
    parser.add_argument("--sft-steps", type=positive_int, metavar="N",
                        help="base SFT steps (default 200)")
    parser.add_argument("--specialist-sft-steps", type=positive_int, metavar="N",
                        help="per-domain SFT steps (default 60)")
    parser.add_argument("--grpo-steps", type=positive_int, metavar="N",
                        help="GRPO steps per specialist (default 30)")
    parser.add_argument("--distill-steps", type=positive_int, metavar="N",
                        help="distillation steps (default 250)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="SFT conversations per step (default 32)")
    parser.add_argument("--group-size", type=positive_int, metavar="G",
                        help="GRPO samples per prompt (default 8)")
    parser.add_argument("--prompts-per-step", type=positive_int, metavar="Q",
                        help="GRPO prompts per step (default 128)")
    parser.add_argument("--prompts-per-domain", type=positive_int, metavar="N",
                        help="distillation samples per domain per step (default 24)")
    parser.add_argument("--sft-problems", type=positive_int, metavar="N",
                        help="SFT training problems per domain (default 2000)")
    parser.add_argument("--eval-size", type=positive_int, metavar="N",
                        help="held-out problems per domain (default 1000)")
    _common(parser)
    parser.set_defaults(run=cmd_posttrain)


def posttrain_config(args: argparse.Namespace):
    from dsv4.posttrain.pipeline import PosttrainConfig

    cfg = PosttrainConfig(out=args.out, from_run=args.source, domains=args.domains,
                          threads=args.threads, progress=not args.no_progress,
                          **_given(args, dict(seed="seed", pretrain_steps="pretrain_steps",
                                              sft_problems="sft_problems",
                                              eval_size="eval_size")))
    replace = dataclasses.replace
    batch = _given(args, dict(batch_size="batch_size"))
    cfg.base_sft = replace(cfg.base_sft, **batch, **_given(args, dict(steps="sft_steps")))
    cfg.specialist_sft = replace(cfg.specialist_sft, **batch,
                                 **_given(args, dict(steps="specialist_sft_steps")))
    cfg.grpo = replace(cfg.grpo, **_given(args, dict(steps="grpo_steps",
                                                     group_size="group_size",
                                                     prompts_per_step="prompts_per_step")))
    cfg.distill = replace(cfg.distill, **_given(args, dict(
        steps="distill_steps", prompts_per_domain="prompts_per_domain")))
    return cfg


def cmd_posttrain(args: argparse.Namespace) -> int:
    from dsv4.posttrain.common import PosttrainError
    from dsv4.posttrain.pipeline import run_posttrain
    from dsv4.pretrain.train import TrainingError

    _prepare(args)
    for name in args.domains or []:
        _domain(name)
    if args.source is not None:
        _load(args.source)  # fail fast on a bad --from, before any work
    try:
        run_posttrain(posttrain_config(args))
    except (PosttrainError, TrainingError) as err:
        raise CommandError(str(err)) from None
    return 0
