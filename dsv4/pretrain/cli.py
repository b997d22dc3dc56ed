"""`dsv4 train` (registered by dsv4.cli.build_parser)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dsv4.commands import CommandError, positive_int
from dsv4.model.config import PRESETS


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    _add_train(subparsers)


# ---- train -------------------------------------------------------------------------------
def _add_train(subparsers: Any) -> None:
    # Defaults live in dsv4.pretrain.train.TrainConfig (not imported here: it pulls in torch, and
    # `dsv4 --help` stays instant); options left out (None) keep them. A test checks the
    # defaults quoted in the help against TrainConfig.
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
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", metavar="NAME", default=None,
                       help=f"model preset: {', '.join(PRESETS)} (default nano)")
    model.add_argument("--config", metavar="PATH",
                       help="a model config.json (any dialect) instead of a preset")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="text / .jsonl / .json / .parquet files or folders (default: the "
                             "Python standard library source of this interpreter)")
    parser.add_argument("--steps", type=positive_int, metavar="N",
                        help="total optimizer steps of the run (default 200); with "
                             "--resume, the step to continue to")
    parser.add_argument("--out", metavar="DIR",
                        help="run directory (default runs/<preset>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (its saved "
                             "settings are used; --steps may extend it)")
    parser.add_argument("--optimizer", choices=("muon", "adamw"),
                        help="muon: Muon for matrices + AdamW for embeddings, head, norms and "
                             "mHC gates (the paper); adamw: AdamW for everything (default "
                             "muon)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="sequences per optimizer step, all processes together "
                             "(default 4)")
    parser.add_argument("--micro-batch", type=positive_int, metavar="N",
                        help="sequences per forward pass per process; smaller than the batch "
                             "means gradient accumulation (default: the whole batch)")
    parser.add_argument("--seq-len", type=positive_int, metavar="N",
                        help="tokens per sequence, a multiple of 128 (default 1024)")
    parser.add_argument("--lr", type=float,
                        help="peak learning rate, shared by Muon and AdamW (default 0.002)")
    parser.add_argument("--warmup-steps", type=int, metavar="N",
                        help="linear LR warm-up steps (default 5%% of --steps)")
    parser.add_argument("--dense-fraction", type=float,
                        metavar="F",
                        help="share of the steps in which CSA layers attend every compressed "
                             "entry while the indexer warms up; sparse top-k afterwards "
                             "(default 0.5)")
    parser.add_argument("--eval-every", type=positive_int, metavar="N",
                        help="validation loss every N steps (default 50)")
    parser.add_argument("--save-every", type=positive_int, metavar="N",
                        help="checkpoint every N steps, and at the end (default 100)")
    parser.add_argument("--seed", type=int,
                        help="weights, data order and samples (default 0)")
    parser.add_argument("--device",
                        help="auto (CUDA if available), cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for torch (default: torch's choice, the core count; "
                             "1 is much faster on a machine busy with other work)")
    parser.add_argument("--fp32", action="store_true",
                        help="no bf16 autocast (slower; for exactness checks)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the corpus tokenizer and token shards are cached "
                             "(default $DSV4_CACHE or ~/.cache/dsv4)")
    parser.add_argument("--samples", type=int, metavar="N",
                        help="samples printed at the end, 0 for none (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: split every MoE layer's routed experts over the "
                             "processes (each keeps n_routed_experts / N, which must divide); "
                             "tokens are exchanged instead of expert weights, everything else "
                             "stays FSDP2. A run setting, kept on --resume. One process: no "
                             "effect")
    parser.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from dsv4.pretrain.train import TrainConfig, TrainingDiverged, TrainingError, train

    preset = args.preset or (None if args.config else "nano")
    given = dict(
        steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch,
        seq_len=args.seq_len, optimizer=args.optimizer, lr=args.lr,
        warmup_steps=args.warmup_steps, dense_fraction=args.dense_fraction,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
        device=args.device, threads=args.threads, cache_dir=args.cache_dir,
        samples=args.samples,
    )
    tc = TrainConfig(
        out=args.out or f"runs/{preset or 'custom'}", preset=preset, config_path=args.config,
        data=args.data, autocast="fp32" if args.fp32 else "bf16", progress=not args.no_progress,
        expert_parallel=args.expert_parallel,
        **{k: v for k, v in given.items() if v is not None},
    )
    if args.resume and args.steps is None:
        tc.steps = None  # keep the run's own total
    try:
        summary = train(tc, resume=args.resume)
    except TrainingDiverged as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C while stopping
        print(f"dsv4 train: interrupted; {tc.out}/checkpoints/latest (if any) is intact",
              file=sys.stderr)
        return 130
    except (TrainingError, ValueError) as err:
        raise CommandError(str(err)) from None
    except OSError as err:  # a full disk: checkpoints/latest still names a complete one
        from dsv4.files import os_error_message

        print(f"dsv4 train: error: {os_error_message(err)}; the latest checkpoint is intact: "
              f"free space, then continue with dsv4 train --out {tc.out} --resume",
              file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0
