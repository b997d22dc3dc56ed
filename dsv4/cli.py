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
                    "a decode FLOPs estimate.",
    )
    add_model_arguments(parser)
    parser.add_argument("--context", type=positive_int, default=DEFAULT_CONTEXT, metavar="N",
                        help=f"sequence length for the KV cache and FLOPs figures "
                             f"(default {DEFAULT_CONTEXT:,})")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    parser.set_defaults(run=cmd_info)


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
    cfg, label = load_model_config(args)
    report = info_report(cfg, label, args.context)
    print(json.dumps(report) if args.json else format_info(report))
    return 0


# ---- entry point -------------------------------------------------------------------------
COMMANDS: list[Callable[[Any], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4", description="DeepSeek-V4, end to end, in readable PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
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
    except BrokenPipeError:  # e.g. `dsv4 info | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
