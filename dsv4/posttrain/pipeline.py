"""`dsv4 posttrain`: the V4 post-training recipe end to end (V4 report, post-training).

    [pretrain a fresh nano briefly, when no --from run is given]
    base        = SFT of the pretrained model on a mix of every domain
    for each domain d:
        sft-d        = SFT of base on d
        specialist-d = GRPO of sft-d on d (reference: sft-d)
    student     = on-policy distillation of base from all specialists (one teacher per domain)
    evaluation  = greedy accuracy on each domain's held-out set: base, sft-d, specialist-d,
                  student -> results.json and accuracy.png

A think-mode domain (`Domain.thinking`, as expr) is trained on its worked reasoning and
sampled and evaluated in think mode in every stage; the others in non-think mode.

Every stage is a run directory under --out (checkpoints/, tokenizer.json, config.json,
metrics.jsonl, posttrain_stage.json when complete); `dsv4 generate --run OUT/student` and
`dsv4 chat --run OUT/student` use them. A stage whose posttrain_stage.json exists is skipped, so
an interrupted pipeline continues where it stopped; each stage's evaluation is cached in its
eval.json. Delete a stage's directory to redo it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.files import atomic_write, write_json_atomic
from dsv4.options import option
from dsv4.posttrain.common import (
    load_model_and_tokenizer,
    save_stage,
    stage_done,
)
from dsv4.posttrain.distill import DistillConfig
from dsv4.posttrain.grpo import GRPOConfig
from dsv4.posttrain.sft import SFTConfig
from dsv4.runtime import set_threads

RESULTS_NAME = "results.json"
PLOT_NAME = "accuracy.png"
EVAL_NAME = "eval.json"
STUDENT_TARGET = 0.9  # the student should keep >= 90% of each specialist's accuracy


@dataclass
class PosttrainConfig:
    # The help texts are also `dsv4 posttrain --help` (dsv4.options).
    out: str = option("runs/posttrain", "output directory", metavar="DIR")
    from_run: str | None = option(None, "pretrained run or checkpoint", metavar="RUN",
                                  default_text="pretrain a fresh nano")
    domains: list[str] | None = option(None, "domains to post-train", metavar="NAME",
                                       default_text="sum sort expr and any from "
                                                    "--domain-module")
    pretrain_steps: int = option(100, "steps of the fresh nano pretraining without --from "
                                 "(~6 min on 2 cores)", positive=True, metavar="N")
    sft_problems: int = option(2000, "SFT training problems per domain", positive=True,
                               metavar="N")
    base_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=200))
    specialist_sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=60, lr=5e-4))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval_size: int = option(1000, "held-out problems per domain", positive=True, metavar="N")
    eval_max_tokens: int = option(24, "tokens per held-out answer")
    threads: int | None = option(None, "CPU threads for torch", positive=True, metavar="N",
                                 default_text="every core this process may use")
    seed: int = option(0, "sampling and data order")
    progress: bool = option(True, "no progress bars")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_posttrain(cfg: PosttrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from dsv4.tasks import DOMAINS, get_domain

    started = time.time()
    set_threads(cfg.threads, all_cores=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(cfg.domains or DOMAINS)
    domains = {name: get_domain(name) for name in names}
    write_json_atomic(out / "posttrain_config.json", cfg.to_dict())
    source = cfg.from_run or pretrain_fresh(cfg, out / "pretrain", log)
    timings: dict[str, float] = {}

    def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.time()
        result = fn(*args)
        timings[stage] = round(time.time() - t, 1)
        return result

    base_dir = out / "base"
    timed("base", sft_stage, source, base_dir, domains, cfg.base_sft, cfg, log, "base")
    for name, domain in domains.items():
        sft_dir, spec_dir = out / f"sft-{name}", out / f"specialist-{name}"
        timed(f"sft-{name}", sft_stage, base_dir, sft_dir, {name: domain}, cfg.specialist_sft,
              cfg, log, f"sft {name}")
        timed(f"specialist-{name}", grpo_stage, sft_dir, spec_dir, domain, cfg, log)
    teachers = {name: out / f"specialist-{name}" for name in names}
    timed("student", distill_stage, base_dir, out / "student", teachers, domains, cfg, log)

    def accuracy(stage: str, which: list[str]) -> dict[str, float]:
        return timed(f"eval-{stage}", evaluate_stage, out / stage, domains, which, cfg)

    results: dict[str, Any] = {
        "base": accuracy("base", names),
        "specialists": {name: accuracy(f"specialist-{name}", names) for name in names},
        "student": accuracy("student", names),
    }
    # Beyond the fixed schema: where each specialist started before GRPO, and the targets.
    results["specialists_sft"] = {name: accuracy(f"sft-{name}", [name])[name] for name in names}
    results["targets"] = targets_report(results, names)
    results["eval_size"] = cfg.eval_size
    results["stage_seconds"] = timings
    results["wall_seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / RESULTS_NAME, results)
    plot_accuracy(results, names, out / PLOT_NAME)
    log(format_table(results, names))
    log(format_timings(timings))
    log(f"results in {out / RESULTS_NAME}, plot {out / PLOT_NAME}; "
        f"{results['wall_seconds'] / 60:.1f} min")
    return results


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def pretrain_fresh(cfg: PosttrainConfig, run: Path, log) -> Path:
    """A briefly pretrained nano (pretrain.train) when no --from run is given; resumed if there."""
    from dsv4.pretrain.train import TrainConfig, train

    latest = run / "checkpoints" / "latest"
    tc = TrainConfig(out=str(run), preset="nano", steps=cfg.pretrain_steps, samples=0,
                     progress=cfg.progress, threads=cfg.threads, seed=cfg.seed,
                     save_every=cfg.pretrain_steps)
    done = latest.is_file() and latest.read_text().strip() == f"step_{cfg.pretrain_steps:06d}"
    if not done:
        log(f"pretraining a fresh nano model for {cfg.pretrain_steps} steps in {run}")
        train(tc, resume=latest.is_file(), log=log)
    return run


def sft_stage(source, target: Path, domains: dict, sft: SFTConfig, cfg: PosttrainConfig,
              log, desc: str) -> None:
    from dsv4.posttrain.sft import domain_chats, run_sft

    if stage_done(target):
        log(f"{desc}: done already ({target})")
        return
    model, tokenizer = load_model_and_tokenizer(source)
    chats, thinking = domain_chats(domains.values(), cfg.sft_problems, cfg.seed)
    sft = dataclasses.replace(sft, seed=cfg.seed, progress=cfg.progress)
    summary = run_sft(model, tokenizer, chats, sft, out=target, desc=desc, thinking=thinking)
    save_stage(model, target, tokenizer, sft.steps,
               dict(stage="sft", source=str(source), domains=list(domains), **summary,
                    config=dataclasses.asdict(sft)))


def grpo_stage(source: Path, target: Path, domain, cfg: PosttrainConfig, log) -> None:
    from dsv4.posttrain.grpo import run_grpo

    if stage_done(target):
        log(f"grpo {domain.name}: done already ({target})")
        return
    model, tokenizer = load_model_and_tokenizer(source)
    reference, _ = load_model_and_tokenizer(source)
    grpo = dataclasses.replace(cfg.grpo, seed=cfg.seed + 101, progress=cfg.progress)
    summary = run_grpo(model, reference, tokenizer, domain, grpo, out=target)
    save_stage(model, target, tokenizer, grpo.steps,
               dict(stage="grpo", source=str(source), domain=domain.name, **summary,
                    config=dataclasses.asdict(grpo)))


def distill_stage(source: Path, target: Path, teachers: dict[str, Path], domains: dict,
                  cfg: PosttrainConfig, log) -> None:
    from dsv4.posttrain.distill import run_distill

    if stage_done(target):
        log(f"distill: done already ({target})")
        return
    student, tokenizer = load_model_and_tokenizer(source)
    teacher_models = {name: load_model_and_tokenizer(path)[0] for name, path in teachers.items()}
    distill = dataclasses.replace(cfg.distill, seed=cfg.seed + 202, progress=cfg.progress)
    summary = run_distill(student, teacher_models, tokenizer, domains, distill, out=target)
    save_stage(model=student, out=target, tokenizer=tokenizer, step=distill.steps,
               summary=dict(stage="distill", source=str(source),
                            teachers={k: str(v) for k, v in teachers.items()}, **summary,
                            config=dataclasses.asdict(distill)))


def evaluate_stage(run: Path, domains: dict, which: list[str], cfg: PosttrainConfig
                   ) -> dict[str, float]:
    """Held-out accuracy of a stage's model on the named domains, cached in run/eval.json."""
    from dsv4.posttrain.common import domain_accuracy

    cache_path = run / EVAL_NAME
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    key = lambda name: f"{name}@{cfg.eval_size}"  # noqa: E731 - a cache key, named for reading
    missing = [name for name in which if key(name) not in cache]
    if missing:
        model, tokenizer = load_model_and_tokenizer(run)
        for name in missing:
            domain = domains[name]
            if cfg.progress:
                print(f"eval {run.name} on {name} ({cfg.eval_size} problems)", flush=True)
            cache[key(name)] = domain_accuracy(model, tokenizer, domain,
                                               domain.eval_set(cfg.eval_size),
                                               max_tokens=cfg.eval_max_tokens)
        write_json_atomic(cache_path, cache)
    return {name: cache[key(name)] for name in which}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def targets_report(results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The issue's targets, per domain: student >= 90% of its specialist; GRPO > SFT."""
    report: dict[str, Any] = {}
    for name in names:
        specialist = results["specialists"][name][name]
        student = results["student"][name]
        before = results["specialists_sft"][name]
        report[name] = dict(
            student_over_specialist=round(student / specialist, 3) if specialist else None,
            student_meets_90pct=student >= STUDENT_TARGET * specialist,
            grpo_gain=round(specialist - before, 4),
            grpo_improves=specialist > before,
        )
    return report


def format_table(results: dict[str, Any], names: list[str]) -> str:
    width = max(12, *(len(n) + 2 for n in names))
    rows = [("base", results["base"])]
    rows += [(f"sft {n} (pre-GRPO)", {n: results["specialists_sft"][n]}) for n in names]
    rows += [(f"specialist {n}", results["specialists"][n]) for n in names]
    rows += [("student", results["student"])]
    label = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(label) + "".join(n.rjust(width) for n in names)]
    for title, accs in rows:
        cells = "".join((f"{accs[n]:.3f}" if n in accs else "-").rjust(width) for n in names)
        lines.append(title.ljust(label) + cells)
    return "\n".join(lines)


def format_timings(timings: dict[str, float]) -> str:
    """Minutes per kind of stage (SFT, GRPO, distillation, evaluation), then per stage."""
    kinds = {"sft": ("base", "sft-"), "grpo": ("specialist-",), "distill": ("student",),
             "eval": ("eval-",)}
    totals = {kind: sum(t for stage, t in timings.items() if stage.startswith(prefixes))
              for kind, prefixes in kinds.items()}
    head = ", ".join(f"{kind} {t / 60:.1f}" for kind, t in totals.items())
    return (f"stage minutes: {head}\n  "
            + ", ".join(f"{stage} {t / 60:.1f}" for stage, t in timings.items()))


def plot_accuracy(results: dict[str, Any], names: list[str], path: Path) -> Path:
    """Grouped bars per domain: base, SFT specialist, GRPO specialist, student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("base (SFT mix)", [results["base"][n] for n in names]),
        ("specialist after SFT", [results["specialists_sft"][n] for n in names]),
        ("specialist after GRPO", [results["specialists"][n][n] for n in names]),
        ("student (OPD)", [results["student"][n] for n in names]),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names)), 4.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.2)  # headroom for the legend above the bars
    ax.set_ylabel(f"held-out accuracy (greedy, n={results.get('eval_size', '?')})")
    ax.set_title("dsv4 posttrain: specialists (SFT -> GRPO) and the distilled student")
    ax.legend(fontsize=8, loc="upper center", ncol=len(series))
    ax.grid(axis="y", alpha=0.3)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

