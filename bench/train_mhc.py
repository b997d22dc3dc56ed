"""mHC vs a plain residual stream: validation loss at the same budget (not a test).

Two `dsv4 train` runs on the default corpus with the same data, steps and schedule; the second
sets `ModelConfig.hc_plain_residual` (x + F(x) around every attention and MoE, no stream mixing).
Prints the validation-loss table and the final gap, writes a PNG.

    python bench/train_mhc.py                 # nano, ~2 x 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_common import add_run_arguments, plot_curves, run_training  # noqa: E402
from dsv4 import ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, out="bench/out/mhc")
    args = parser.parse_args()
    base = ModelConfig.from_preset(args.preset)
    curves = {
        "mHC (4 streams)": run_training(args, "mhc", model_config=base.to_dict()),
        "plain residual": run_training(
            args, "plain", model_config=base.replace(hc_plain_residual=True).to_dict()),
    }
    mhc, plain = curves.values()
    print(f"\n{args.preset}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"lr {args.lr}, Muon, same data and schedule")
    print(f"{'step':>6s}{'mHC val':>12s}{'plain val':>12s}")
    for (step, a), (_, b) in zip(mhc, plain):
        print(f"{step:6d}{a:12.4f}{b:12.4f}")
    print(f"final: mHC {mhc[-1][1]:.4f}, plain {plain[-1][1]:.4f}, "
          f"difference {plain[-1][1] - mhc[-1][1]:+.4f} nats (positive: mHC better)")
    png = plot_curves(curves, Path(args.out) / "mhc.png",
                      f"mHC vs plain residual ({args.preset}, validation loss)")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
