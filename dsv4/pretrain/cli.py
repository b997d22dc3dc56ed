"""`dsv4 train` (registered by dsv4.cli.build_parser)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dsv4.commands import CommandError
from dsv4.options import add_dataclass_options, dataclass_from_args


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    _add_train(subparsers)


# ---- train -------------------------------------------------------------------------------
# The TrainConfig fields `dsv4 train` exposes; their defaults and help are the fields' own.
MODEL_FIELDS = ("preset", "config_path")
TRAIN_FIELDS = ("data", "steps", "out", "optimizer", "batch_size", "micro_batch", "seq_len", "lr",
                "warmup_steps", "dense_fraction", "eval_every", "save_every", "seed", "device",
                "threads", "cache_dir", "samples", "progress", "expert_parallel")
RENAME = {"config_path": "--config", "autocast": "--fp32"}


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain a V4 model (default: nano on the Python standard library, ~10 min CPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a DeepSeek-V4-architecture model the way the paper does: Muon, "
                    "mHC, hash-routed and balanced MoE, MTP, compressed attention with the "
                    "Lightning Indexer (dense warm-up, then sparse top-k), packed documents "
                    "without cross-document attention, bf16 autocast. With no options: the "
                    "nano preset on the Python standard library of this interpreter, about 10 "
                    "minutes on 2 CPU cores, then a few samples.\n\n"
                    "The run directory (--out) gets config.json, train_config.json, "
                    "tokenizer.json, metrics.jsonl (one JSON object per step: step, loss, lr, "
                    "tokens_per_s, mfu, val_loss, ...), loss.png and checkpoints/step_N/ "
                    "(load with dsv4.load(RUN)). Ctrl-C saves and stops; --resume continues.\n"
                    "Several processes: torchrun --nproc_per_node N -m dsv4 train ... (FSDP2).",
    )
    parser.defer(_add_train_config_options)
    parser.set_defaults(run=cmd_train)


def _add_train_config_options(parser: argparse.ArgumentParser) -> None:
    from dsv4.pretrain.train import TrainConfig  # imports torch: only when `train` is parsed

    defaults = TrainConfig()
    model = parser.add_mutually_exclusive_group()
    add_dataclass_options(model, defaults, MODEL_FIELDS, rename=RENAME)
    add_dataclass_options(parser, defaults, TRAIN_FIELDS, rename=RENAME)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (its saved "
                             "settings are used; --steps may extend it)")
    parser.add_argument("--fp32", action="store_const", const="fp32", default=argparse.SUPPRESS,
                        help="no bf16 autocast (slower; for exactness checks)")


def train_config(args: argparse.Namespace):
    """The TrainConfig of `dsv4 train ...`: the options given, the defaults for the rest."""
    from dsv4.pretrain.train import TrainConfig

    tc = dataclass_from_args(TrainConfig(), args, (*MODEL_FIELDS, *TRAIN_FIELDS, "autocast"),
                             rename=RENAME)
    if tc.config_path is not None:
        tc.preset = None
    if "out" not in vars(args):
        tc.out = f"runs/{tc.preset or 'custom'}"
    if args.resume and "steps" not in vars(args):
        tc.steps = None  # keep the run's own total
    return tc


def cmd_train(args: argparse.Namespace) -> int:
    from dsv4.pretrain.train import TrainingDiverged, train

    tc = train_config(args)
    try:
        summary = train(tc, resume=args.resume)
    except TrainingDiverged as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C while stopping
        print(f"dsv4 train: interrupted; {tc.out}/checkpoints/latest (if any) is intact",
              file=sys.stderr)
        return 130
    except ValueError as err:  # not all are dsv4.Error yet (e.g. --expert-parallel's check)
        raise CommandError(str(err)) from None
    except OSError as err:  # a full disk: checkpoints/latest still names a complete one
        from dsv4.files import os_error_message

        print(f"dsv4 train: error: {os_error_message(err)}; the latest checkpoint is intact: "
              f"free space, then continue with dsv4 train --out {tc.out} --resume",
              file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0
