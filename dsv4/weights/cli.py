"""`dsv4 info` (a configuration's costs, or a checkpoint's layout) and `dsv4 convert`
(registered by dsv4.cli.build_parser)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dsv4.commands import (
    byte_size,
    format_bytes,
    format_count,
    format_flops,
    load_model_config,
    positive_int,
)
from dsv4.model.config import PRESETS, ModelConfig

DEFAULT_CONTEXT = 1_048_576


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    add_info(subparsers)
    add_convert(subparsers)


# ---- info --------------------------------------------------------------------------------
def add_info(subparsers: Any) -> None:
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
    from dsv4.model import costs

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
        f"Decode FLOPs per token at position {t:,} (rough)",
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
    from dsv4.weights.checkpoint import describe, load

    ckpt = describe(args.checkpoint)
    if args.verify:
        load(args.checkpoint, quantized=True, verify=True)
        ckpt["notes"].append("every weight read and checked: finite, within range")
    else:
        ckpt["notes"].append("weight values not read here (--verify checks them, as every "
                             "load does)")
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


# ---- convert -----------------------------------------------------------------------------

def add_convert(subparsers: Any) -> None:
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
    from dsv4.weights.checkpoint import convert, describe

    out = convert(args.src, args.dst, args.to, dtype=args.dtype,
                  expert_dtype=args.expert_dtype, max_shard_bytes=args.max_shard_size,
                  progress=sys.stderr.isatty())
    written = describe(out)
    dtypes = ", ".join(f"{name} {d['tensors']}" for name, d in written["dtypes"].items())
    print(f"wrote {written['format']} checkpoint {out}: {len(written['files'])} file(s), "
          f"{format_bytes(written['file_bytes'])}, {written['tensors']} tensors ({dtypes})")
    return 0
