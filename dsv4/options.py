"""Configuration dataclasses that make their own command-line options.

A config field states its default and its help once, with `option`:

    steps: int = option(200, "total optimizer steps of the run", positive=True, metavar="N")

and a command turns the fields it exposes into argparse options and back:

    add_dataclass_options(parser, TrainConfig(), ["steps", "lr"])
    cfg = dataclass_from_args(TrainConfig(), args, ["steps", "lr"])

The option's type comes from the field's annotation (int, float, str, bool, lists, `X | None`),
its name from the field (`batch_size` -> `--batch-size`, or `rename`), and `--help` quotes the
instance's own value as the default, so help and behaviour cannot drift apart. Options left out
do not appear in the parsed namespace at all (argparse.SUPPRESS): reading them back keeps the
given instance's values, which is how a nested config (PosttrainConfig.base_sft, 200 steps) or a
resumed run keeps defaults of its own.

This module imports no torch, so a command's parser stays cheap to build.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

MISSING: Any = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING,
           positive: bool = False, choices: Iterable[str] | None = None,
           metavar: str | None = None, default_text: str | None = None) -> Any:
    """A dataclass field with its command-line help.

    positive: ints and floats must be > 0 (ints >= 1). default_text: what `--help` says instead
    of the value, for defaults computed later (None: "5% of the steps")."""
    metadata = dict(help=help, positive=positive, choices=tuple(choices) if choices else None,
                    metavar=metavar, default_text=default_text)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=metadata)


# ---- argument types ---------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


# ---- dataclass -> options -----------------------------------------------------------------
def option_string(field: dataclasses.Field, default: Any, rename: Mapping[str, str]) -> str:
    """`--batch-size` for batch_size; a flag that turns a True default off is `--no-<name>`."""
    if field.name in rename:
        return rename[field.name]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if default is True else f"--{name}"


def dest_of(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def add_dataclass_options(parser: Any, config: Any, names: Iterable[str], *,
                          rename: Mapping[str, str] | None = None,
                          helps: Mapping[str, str] | None = None) -> None:
    """Add an option for each field in `names` of the dataclass instance `config` to `parser`
    (or an argument group); its value is the default `--help` quotes. `rename` maps a field to
    its option string, `helps` a field to help text other than the field's own."""
    rename, helps = rename or {}, helps or {}
    fields = _fields_by_name(config)
    hints = typing.get_type_hints(type(config))
    for name in names:
        field, default = fields[name], getattr(config, name)
        option = option_string(field, default, rename)
        kwargs = _argparse_kwargs(hints[name], field, default)
        text = helps.get(name, field.metadata.get("help", ""))
        parser.add_argument(option, dest=dest_of(option), default=argparse.SUPPRESS,
                            help=_with_default(text, field, default), **kwargs)


def dataclass_from_args(config: Any, args: argparse.Namespace, names: Iterable[str], *,
                        rename: Mapping[str, str] | None = None) -> Any:
    """A copy of `config` with the fields in `names` that the command line gave; the same
    `names` and `rename` as add_dataclass_options."""
    rename = rename or {}
    fields = _fields_by_name(config)
    given = {}
    for name in names:
        dest = dest_of(option_string(fields[name], getattr(config, name), rename))
        if dest in vars(args):
            given[name] = getattr(args, dest)
    return dataclasses.replace(config, **given)


def _fields_by_name(config: Any) -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(config)}


def _argparse_kwargs(hint: Any, field: dataclasses.Field, default: Any) -> dict[str, Any]:
    """type / action / nargs / choices / metavar for one field's annotation."""
    hint = _without_none(hint)
    meta = field.metadata
    if hint is bool:  # a flag that flips the default
        return dict(action="store_const", const=not default)
    kwargs: dict[str, Any] = {}
    if typing.get_origin(hint) is list:
        kwargs["nargs"] = "+"
        (hint,) = typing.get_args(hint)
    if meta.get("positive"):
        kwargs["type"] = {int: positive_int, float: positive_float}[hint]
    elif hint in (int, float):
        kwargs["type"] = hint
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    return kwargs


def _without_none(hint: Any) -> Any:
    """int for `int | None` (an option given always has a value)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _with_default(text: str, field: dataclasses.Field, default: Any) -> str:
    """The help text with its true default; % escaped, since argparse formats help with %."""
    if isinstance(default, bool):
        return text.replace("%", "%%")  # a flag: its name says what giving it does
    shown = field.metadata.get("default_text") or _shown(default)
    return f"{text} (default: {shown})".replace("%", "%%").lstrip()


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)
