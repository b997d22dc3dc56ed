"""Fault injection for tests: a disk that fills up at a chosen file.

`full_disk(monkeypatch, "metrics.jsonl", after=10)` makes writes to any file whose path
contains "metrics.jsonl" fail with ENOSPC once `after` bytes went in (the first failing write
still puts the bytes that fit, as a real full disk does). It wraps the ways dsv4 writes:
`os.write` (appends), file objects from `os.fdopen` (atomic writes, torch.save) and from
`open` / `Path.open` (token stores).
`monkeypatch` is pytest's fixture or a `pytest.MonkeyPatch()` (bench/hostile.py uses one in
a child process).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from typing import Any


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class _Budget:
    def __init__(self, after: int) -> None:
        self.left = after
        self.failures = 0

    def take(self, n: int) -> int:
        """How many of n bytes fit; raises ENOSPC (after the caller wrote them) if not all."""
        fit = max(0, min(n, self.left))
        self.left -= fit
        return fit

    def error(self) -> OSError:
        self.failures += 1
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
    def __init__(self, f: Any, budget: _Budget) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        view = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
        fit = self._budget.take(len(view))
        if fit:
            self._f.write(view[:fit].tobytes() if "b" in getattr(self._f, "mode", "b")
                          else bytes(view[:fit]).decode("utf-8", "ignore"))
        if fit < len(view):
            self._f.flush()
            raise self._budget.error()
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)


def full_disk(monkeypatch, match: str, after: int = 0) -> _Budget:
    budget = _Budget(after)
    real_write, real_fdopen = os.write, os.fdopen

    def write(fd: int, data: Any) -> int:
        if match not in _path_of(fd):
            return real_write(fd, data)
        fit = budget.take(len(data))
        if fit:
            real_write(fd, bytes(data[:fit]))
        if fit < len(data):
            raise budget.error()
        return fit

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        f = real_fdopen(fd, *args, **kwargs)
        return _FullFile(f, budget) if match in _path_of(fd) else f

    real_open = io.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        return _FullFile(f, budget) if writing and match in str(file) else f

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    return budget
