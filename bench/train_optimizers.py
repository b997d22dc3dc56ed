"""Muon vs AdamW: validation loss of the same model, data, schedule and steps (not a test).

Two `dsv4 train` runs on the default corpus (the Python standard library) that differ only in
the optimizer: Muon for the matrices + AdamW for the rest (the paper, spec training.md §1) and
AdamW for everything. Prints the validation-loss table, the step at which Muon first reaches
AdamW's final validation loss (target: at most 75% of the steps), and writes a PNG.

    python bench/train_optimizers.py                      # nano, ~2 x 3 minutes on 2 CPU cores
    python bench/train_optimizers.py --steps 400 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_common import add_run_arguments, plot_curves, run_training, steps_to_reach  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, out="bench/out/optimizers")
    parser.add_argument("--adamw-lr", type=float, default=None,
                        help="peak LR of the AdamW run (default: --lr, the paper's premise that "
                             "Muon reuses AdamW's hyper-parameters)")
    args = parser.parse_args()
    curves = {"adamw": run_training(args, "adamw", optimizer="adamw",
                                    lr=args.adamw_lr or args.lr),
              "muon": run_training(args, "muon", optimizer="muon")}
    adamw_final = curves["adamw"][-1][1]
    reach = steps_to_reach(curves["muon"], adamw_final)
    print(f"\n{args.preset}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"lr {args.lr} (AdamW {args.adamw_lr or args.lr}), same schedule and data")
    print(f"{'step':>6s}{'AdamW val':>12s}{'Muon val':>12s}")
    for (step, a), (_, m) in zip(curves["adamw"], curves["muon"]):
        print(f"{step:6d}{a:12.4f}{m:12.4f}")
    if reach is None:
        print(f"Muon never reached AdamW's final validation loss {adamw_final:.4f}")
    else:
        print(f"Muon reaches AdamW's final validation loss {adamw_final:.4f} at step {reach} "
              f"= {reach / args.steps:.0%} of the steps (target <= 75%)")
    png = plot_curves(curves, Path(args.out) / "optimizers.png",
                      f"Muon vs AdamW ({args.preset}, validation loss)")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
