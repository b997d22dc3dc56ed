"""`dsv4 <command>`: the command line. This module only dispatches.

Each stage's commands live in its package's cli.py, which declares them through
`add_commands(subparsers)`: a command is two small functions, `_add_<name>(subparsers)` (its
arguments) and `cmd_<name>(args) -> int` (running it). What they share (`CommandError`,
argument types, loading a model) is dsv4.commands; nothing imports this module back. Commands
import heavy modules (torch, the network) inside `cmd_<name>`, so `dsv4 info` and
`dsv4 --help` stay instant.

Bad input (unknown preset, unreadable config: any dsv4.Error) ends in one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dsv4.commands import CommandParser
from dsv4.errors import Error
from dsv4.evaluate import cli as evaluate_cli
from dsv4.inference import cli as inference_cli
from dsv4.posttrain import cli as posttrain_cli
from dsv4.pretrain import cli as pretrain_cli
from dsv4.server import cli as server_cli
from dsv4.weights import cli as weights_cli

# In the order `dsv4 --help` lists them.
COMMANDS: list[Callable[[Any], None]] = [
    weights_cli.add_info, pretrain_cli.add_commands, inference_cli.add_commands,
    weights_cli.add_convert, posttrain_cli.add_commands, server_cli.add_commands,
    evaluate_cli.add_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4", description="DeepSeek-V4, end to end, in readable PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=CommandParser)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dsv4 ...`; returns the exit code (argparse exits 2 itself on bad syntax)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Error as err:  # the user's to fix, and the message says how: no traceback
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
