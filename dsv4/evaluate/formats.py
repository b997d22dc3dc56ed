"""Reading benchmark files: JSON lines, JSON arrays, CSV and Parquet, row by row, each row with
a `where` ("file:line" for text formats, "file#row N" for Parquet) that every error names."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsv4.evaluate.backends import EvalError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class FormatError(EvalError):
    """A malformed benchmark file; the message starts with "file:line" and names the field."""


def read_rows(path: str | Path, csv_columns: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a benchmark file.

    csv_columns: column names for a CSV file without a header row (the original MMLU CSVs);
    a CSV whose first row has a "question" or "input" cell is read as having a header.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path, csv_columns)
    elif suffix in (".jsonl", ".json"):
        yield from _json_rows(path)
    else:
        raise FormatError(f"{path}: unknown benchmark file type {suffix!r} (expected one of "
                          f"{', '.join(SUFFIXES)})")


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise FormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        for i, row in enumerate(rows):
            yield _checked(row, f"{path}#row {i}")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})"
                              ) from None
        yield _checked(row, f"{path}:{lineno}")


def _checked(row: Any, where: str) -> tuple[str, dict]:
    if not isinstance(row, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return where, row


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = None
        for values in reader:
            if not values:
                continue
            if header is None:
                if {"question", "input"} & set(values) or not columns:
                    header = values
                    continue
                header = list(columns)
            where = f"{path}:{reader.line_num}"
            if len(values) != len(header):
                raise FormatError(f"{where}: {len(values)} columns, expected {len(header)} "
                                  f"({', '.join(header)})")
            yield where, dict(zip(header, values))


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise FormatError(f"{path}: not a readable Parquet file: {err}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}#row {i}", row


def field(row: dict, names: tuple[str, ...], where: str, what: str) -> Any:
    """The first of `names` present in the row; FormatError naming them otherwise."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    alternatives = " or ".join(f'"{n}"' for n in names)
    raise FormatError(f"{where}: no {what} field ({alternatives}); the row has "
                      f"{sorted(row)[:10]}")


def text_field(row: dict, names: tuple[str, ...], where: str, what: str) -> str:
    value = field(row, names, where, what)
    if not isinstance(value, str):
        raise FormatError(f"{where}: {what} must be a string, got {type(value).__name__} "
                          f"{value!r:.60}")
    return value
