"""Resumable results: one JSON line per finished item, appended and flushed as it finishes.

A suite's out directory holds `settings.json` (what was run: model, suite, data, options),
`items.jsonl` (one object per finished item, keyed by `"key"`) and, at the end,
`results.json`. A crash or Ctrl-C loses at most the item being computed: the next run with
the same settings reads `items.jsonl`, skips the finished keys and computes the rest. A line
cut short by a crash (no trailing newline, invalid JSON) is dropped and rewritten. Different
settings in the same directory are refused (the results would mix), unless `fresh=True`.

The settings include fingerprints of what the results depend on besides the options: the
weights (`weights_fingerprint`: the checkpoint folder a path resolves to, with its files' names,
sizes and modification times; no weight is read) and the data (`data_fingerprint`: a hash of
the benchmark files' contents). A retrained checkpoint behind the same run path, or an edited
data file, is therefore another run, never a stale resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dsv4.errors import Error
from dsv4.files import append_line, write_json_atomic

ITEMS_NAME = "items.jsonl"
SETTINGS_NAME = "settings.json"


class StoreError(Error, ValueError):
    """The out directory cannot be used for this run (other settings, unreadable items)."""


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """Which weights a checkpoint path loads now: the folder it resolves to (a run's latest)
    and the size and modification time of each file in it."""
    from dsv4.weights.checkpoint import resolve

    folder = resolve(path)
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return f"{folder.name}:{digest.hexdigest()[:16]}"


def data_fingerprint(paths: Iterable[str | os.PathLike[str] | None]) -> str | None:
    """A hash of the contents of the given files (every file below a folder); None if none."""
    files: list[Path] = []
    for given in paths:
        if given is None:
            continue
        path = Path(given)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"\0{file}\0".encode())
        if file.is_file():  # a missing file is reported by the suite that reads it
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


class ResultStore:
    """Finished items of one suite run, persisted line by line in `out_dir/items.jsonl`."""

    def __init__(self, out_dir: str | os.PathLike[str], settings: dict[str, Any],
                 fresh: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items_path = self.dir / ITEMS_NAME
        settings = json.loads(json.dumps(settings))  # what reading it back gives
        settings_path = self.dir / SETTINGS_NAME
        if fresh:
            self.items_path.unlink(missing_ok=True)
            (self.dir / "results.json").unlink(missing_ok=True)
        elif settings_path.is_file() and self.items_path.is_file():
            old = json.loads(settings_path.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                key = changed[0]
                raise StoreError(
                    f"{self.dir} holds results of another run ({key}: {old.get(key)!r} there, "
                    f"{settings.get(key)!r} now); use another --out or --fresh to start over")
        write_json_atomic(settings_path, settings)
        self.records: dict[str, dict[str, Any]] = self._read()
        self.resumed = len(self.records)

    def _read(self) -> dict[str, dict[str, Any]]:
        """Finished records; a torn last line (the crash happened while writing it) is cut."""
        if not self.items_path.is_file():
            return {}
        records: dict[str, dict[str, Any]] = {}
        good_bytes = 0
        with self.items_path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("no newline")
                    record = json.loads(raw)
                    key = record["key"]
                except (ValueError, KeyError, TypeError):
                    rest = f.read()
                    if rest:  # damage before the end is not a torn write: do not guess
                        raise StoreError(f"{self.items_path}:{lineno}: not a result line; "
                                         "remove the file or use --fresh") from None
                    break
                records[key] = record
                good_bytes += len(raw)
        if good_bytes != self.items_path.stat().st_size:
            with self.items_path.open("r+b") as f:
                f.truncate(good_bytes)
        return records

    def done(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict[str, Any]) -> None:
        """Persist one finished item (it needs a "key"); durable when this returns."""
        if "key" not in record:
            raise ValueError("a result record needs a 'key'")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        append_line(self.items_path, line, durable=True)  # whole line or nothing, named errors
        self.records[record["key"]] = json.loads(line)

    def ordered(self, keys: list[str]) -> list[dict[str, Any]]:
        """The records of `keys`, in that order (every key must be done)."""
        return [self.records[k] for k in keys]
