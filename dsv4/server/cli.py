"""Command-line entry points of this package (registered by dsv4.cli.build_parser): `dsv4 serve`.

fastapi, uvicorn and torch are imported inside the command, so `dsv4 --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dsv4.commands import (
    CommandError,
    add_chat_encoding_argument,
    add_compile_argument,
    add_tokenizer_argument,
    byte_size,
    compile_requested,
    format_bytes,
    positive_int,
)
from dsv4.server.protocol import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
)

DEFAULT_MAX_BATCH = 8
DEFAULT_CONTEXT = 8192
DEFAULT_MAX_QUEUE = 64
BUDGET_ROUNDING = 128  # capacities from a byte budget are multiples of the HCA ratio


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    _add_serve(subparsers)


def _add_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat, completions, streaming, tools)",
        description="Serve a model over HTTP with the OpenAI API: GET /v1/models, POST "
                    "/v1/completions, POST /v1/chat/completions (streaming, reasoning_effort, "
                    "tools), GET /health. Requests join the running decode batch between "
                    "steps (continuous batching) in a KV cache of --max-batch slots; the cache "
                    "budget (--cache-tokens or --cache-bytes) sets each request's capacity "
                    "(prompt + output). Beyond the slots, up to --max-queue requests wait; "
                    "more get HTTP 429. Try it without a checkpoint: "
                    "dsv4 serve --preset nano --random",
    )
    parser.add_argument("checkpoint", nargs="?", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory written by `dsv4 train` (its latest checkpoint) "
                             "or a checkpoint folder in any layout dsv4 reads")
    source = parser.add_argument_group("model without a checkpoint")
    source.add_argument("--preset", metavar="NAME", help="with --random: a built-in configuration")
    source.add_argument("--config", metavar="PATH", help="with --random: a config.json")
    source.add_argument("--random", action="store_true",
                        help="random weights (seeded by --seed); with no tokenizer at hand a "
                             "byte-level one is used")
    source.add_argument("--seed", type=int, default=0, help="weights seed for --random")
    add_tokenizer_argument(source)
    add_chat_encoding_argument(parser)
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on "
                     "(default 127.0.0.1; 0.0.0.0 for every interface)")
    net.add_argument("--port", type=int, default=8000,
                     help="port (default 8000; 0 picks a free one, printed at start)")
    net.add_argument("--served-model-name", metavar="NAME",
                     help="the model id clients send (default: the run directory's name, or "
                          "PRESET-random)")
    budget = parser.add_argument_group("batching and cache budget")
    budget.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help=f"requests decoded together = cache slots (default "
                             f"{DEFAULT_MAX_BATCH})")
    budget.add_argument("--context", type=positive_int, default=None, metavar="N",
                        help=f"most tokens per request, prompt + output (default "
                             f"{DEFAULT_CONTEXT:,}, or the budget divided by --max-batch; at "
                             "most the model's max_seq_len)")
    sizes = budget.add_mutually_exclusive_group()
    sizes.add_argument("--cache-tokens", type=positive_int, default=None, metavar="N",
                       help="cache budget in tokens over all slots: each request's capacity is "
                            "N / --max-batch")
    sizes.add_argument("--cache-bytes", type=byte_size, default=None, metavar="SIZE",
                       help="cache budget in bytes (e.g. 2GiB), converted with the cache's "
                            "bytes per token")
    budget.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests that may wait for a slot; beyond that: HTTP 429 "
                             f"(default {DEFAULT_MAX_QUEUE})")
    budget.add_argument("--prefill-chunk", type=positive_int, default=512, metavar="N",
                        help="most prompt tokens a request feeds per engine step, so long "
                             "prompts do not stall the running batch (default 512)")
    bounds = parser.add_argument_group("limits per request and connection")
    bounds.add_argument("--max-body-bytes", type=byte_size, default=DEFAULT_MAX_BODY_BYTES,
                        metavar="SIZE", help="largest request body; larger: HTTP 413 before "
                        "reading it (default 8MiB)")
    bounds.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        metavar="S", help="seconds a client may take to send its body; longer: "
                        f"HTTP 408 (default {DEFAULT_BODY_TIMEOUT_S:g})")
    bounds.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        metavar="S", help="seconds a connection may stay open without sending "
                        "a complete request head (idle or slow clients are closed; default "
                        f"{DEFAULT_HEADER_TIMEOUT_S:g})")
    bounds.add_argument("--max-score-tokens", type=positive_int, default=None, metavar="N",
                        help="longest prompt scored by echo + max_tokens 0 + logprobs (default: "
                             "the per-request capacity; at most the model's max_seq_len)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                         help="weights and cache dtype (default bf16)")
    runtime.add_argument("--device", default=None,
                         help="cpu or cuda[:N] (default: cuda when available)")
    runtime.add_argument("--kv-fp8", action="store_true",
                         help="store the cache's non-RoPE dims in FP8 (about half the memory)")
    add_compile_argument(runtime)
    runtime.add_argument("--threads", type=positive_int, default=None, metavar="N",
                         help="CPU threads for torch (default: torch's choice)")
    runtime.add_argument("--log-level", default="warning",
                         choices=["critical", "error", "warning", "info", "debug"],
                         help="uvicorn's log level (default warning)")
    parser.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from dsv4.commands import load_inference_model
    from dsv4.server.app import create_app
    from dsv4.server.limits import ServerLimits, bounded_protocol, return_large_buffers

    if not (args.checkpoint or args.preset or args.config):
        raise CommandError("give a model: dsv4 serve RUN_OR_CHECKPOINT, or --preset NAME "
                           "--random")
    if args.max_queue < 0:
        raise CommandError(f"--max-queue {args.max_queue}: must be at least 0")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port}: must be in [0, 65535]")
    for flag in ("body_timeout", "header_timeout"):
        if not getattr(args, flag) > 0:
            raise CommandError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a "
                               "positive number of seconds")
    return_large_buffers()
    model, tokenizer, label = load_inference_model(args)
    capacity = request_capacity(model, args)
    engine = build_serving_engine(model, args, capacity)
    name = args.served_model_name or default_model_name(args)
    if args.max_score_tokens is not None and args.max_score_tokens > model.cfg.max_seq_len:
        raise CommandError(f"--max-score-tokens {args.max_score_tokens}: more than the model's "
                           f"max_seq_len {model.cfg.max_seq_len}")
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
                          header_timeout_s=args.header_timeout,
                          max_score_tokens=args.max_score_tokens)
    app = create_app(engine, tokenizer, name, max_queue=args.max_queue,
                     chat_encoding=args.chat_encoding, limits=limits)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    # Listen before announcing the address: a client that connects on reading the line then
    # waits in the backlog until uvicorn accepts, instead of being refused.
    sock.listen(2048)
    port = sock.getsockname()[1]
    cache_bytes = engine.cache.bytes_by_kind()["total"]
    print(f"dsv4 serve: {label} as {name!r}: {args.max_batch} slots x {capacity:,} tokens, "
          f"cache {format_bytes(cache_bytes)}, queue {args.max_queue}", file=sys.stderr)
    print(f"listening on http://{args.host}:{port}/v1", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                            http=bounded_protocol(args.header_timeout))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def default_model_name(args: argparse.Namespace) -> str:
    if args.checkpoint:
        return os.path.basename(os.path.normpath(args.checkpoint))
    if args.preset:
        return f"{args.preset}-random"
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.config)))[0]
    return f"{stem}-random"


def request_capacity(model, args: argparse.Namespace) -> int:
    """Tokens per cache slot from --context and the budget (--cache-tokens / --cache-bytes)."""
    limit = model.cfg.max_seq_len
    if args.context is not None:
        limit = min(limit, args.context)
    if args.cache_tokens is not None:
        capacity = min(limit, args.cache_tokens // args.max_batch)
        source = f"--cache-tokens {args.cache_tokens:,}"
    elif args.cache_bytes is not None:
        capacity = min(limit, capacity_for_bytes(model, args, args.cache_bytes // args.max_batch))
        source = f"--cache-bytes {format_bytes(args.cache_bytes)}"
    else:
        return min(limit, DEFAULT_CONTEXT)
    if capacity < 2:
        raise CommandError(f"{source} over --max-batch {args.max_batch} slots leaves "
                           f"{max(capacity, 0)} tokens per request: raise the budget or lower "
                           "--max-batch")
    return capacity


def capacity_for_bytes(model, args: argparse.Namespace, slot_bytes: int) -> int:
    """The largest capacity (a multiple of 128) whose one-slot cache fits in `slot_bytes`.
    A slot costs a fixed part (window rings, compressor state) plus a part linear in its
    capacity (compressed entries): measured on two small caches."""
    from dsv4.inference.cache import KVCache

    def cost(capacity: int) -> int:
        cache = KVCache(model, 1, capacity, kv_fp8=args.kv_fp8)
        return cache.bytes_by_kind()["total"]

    small, large = BUDGET_ROUNDING, 4 * BUDGET_ROUNDING
    fixed_and_small, per_token = cost(small), (cost(large) - cost(small)) / (large - small)
    fixed = fixed_and_small - per_token * small
    if slot_bytes < fixed + per_token * BUDGET_ROUNDING:
        raise CommandError(f"--cache-bytes: {format_bytes(slot_bytes)} per slot is less than one "
                           f"slot's fixed {format_bytes(fixed)} (window rings, compressor state) "
                           f"plus {BUDGET_ROUNDING} tokens: raise it or lower --max-batch")
    tokens = int((slot_bytes - fixed) / per_token) if per_token else model.cfg.max_seq_len
    return tokens // BUDGET_ROUNDING * BUDGET_ROUNDING


def build_serving_engine(model, args: argparse.Namespace, capacity: int):
    from dsv4.inference.engine import Engine

    try:
        return Engine(model, max_batch=args.max_batch, capacity=capacity, kv_fp8=args.kv_fp8,
                      prefill_chunk=args.prefill_chunk, seed=args.seed,
                      compile=compile_requested(args))
    except ValueError as err:  # CacheError: kv_fp8 with this head size, ...
        raise CommandError(str(err)) from None
