"""Command-line entry points of this package (registered by dsv4.cli.build_parser)."""

from __future__ import annotations

from typing import Any


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
