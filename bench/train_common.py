"""Helpers shared by the training benchmarks: run `dsv4.pretrain.train.train` quietly, read the
validation curve, plot curves."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 is faster on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out, help="folder for the runs and the PNG")


def run_training(args: argparse.Namespace, name: str,
                 model_config: dict[str, Any] | None = None, **changes: Any
                 ) -> list[tuple[int, float]]:
    """Train one run from scratch into OUT/name; returns [(step, val_loss)]."""
    from dsv4.pretrain.train import TrainConfig, read_metrics, train

    out = Path(args.out) / name
    shutil.rmtree(out, ignore_errors=True)
    changes.setdefault("lr", args.lr)
    tc = TrainConfig(out=str(out), preset=args.preset, steps=args.steps,
                     batch_size=args.batch_size, seq_len=args.seq_len,
                     eval_every=args.eval_every, eval_batches=args.eval_batches,
                     save_every=args.steps, samples=0, device=args.device,
                     threads=args.threads, seed=args.seed, progress=True,
                     model_config=model_config, **changes)
    start = time.perf_counter()
    train(tc, log=lambda *a: None)
    rows = read_metrics(out)
    curve = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    print(f"{name}: final val loss {curve[-1][1]:.4f} in {time.perf_counter() - start:.0f} s")
    return curve


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (linear interpolation between
    evaluations, since they are `eval_every` apart)."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None:
                return step
            (s0, l0) = previous
            return round(s0 + (step - s0) * (l0 - target) / max(l0 - loss, 1e-12))
        previous = (step, loss)
    return None


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), "o-", label=name, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
