"""`dsv4 generate` and `dsv4 chat` (registered by dsv4.cli.build_parser)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from dsv4.commands import (
    CommandError,
    add_chat_encoding_argument,
    add_compile_argument,
    add_tokenizer_argument,
    compile_requested,
    load_inference_model,
    positive_int,
)
from dsv4.model.config import PRESETS


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    _add_generate(subparsers)
    _add_chat(subparsers)


# ---- generate / chat ---------------------------------------------------------------------

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


def build_engine(args: argparse.Namespace, model, tokenizer):
    from dsv4.inference.engine import Engine, SamplingParams

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

    from dsv4.inference.engine import TextStream

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
    from dsv4.text.chat import StreamParser, collect_events, encode_chat_ids

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
