"""Atomic file writes (readers see the old file or the new one, never half of one), an
exclusive lock per folder, and the leftovers of interrupted writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"  # every temporary file or folder written here: `.{name}.{random}.tmp`


class _NamedWrites:
    """A file object whose write errors name the file: a full disk inside `torch.save` or
    `json.dump` otherwise surfaces as an error naming no path (or as torch's own
    RuntimeError, which hides the OSError entirely)."""

    def __init__(self, f: IO, path: Path) -> None:
        self._f, self._path = f, path
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = with_path(err, self._path)
            raise self.error from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def with_path(err: OSError, path: str | os.PathLike[str]) -> OSError:
    """`err` naming `path` (an OSError raised by a write names no file)."""
    if err.filename is not None or err.errno is None:  # named already, or not from the OS
        return err
    return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))


def os_error_message(err: OSError) -> str:
    """One line for the user: 'runs/x/metrics.jsonl: No space left on device'."""
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on device"
    return f"{err.filename}: {reason}" if err.filename is not None else reason


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` ("w" text or "wb" binary); on a clean exit it is
    flushed to disk and renamed over `path`, on an error it is removed. A failed write (a
    full disk, ...) raises an OSError naming `path`."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                   suffix=TEMP_SUFFIX)
    except OSError as err:
        raise with_path(err, target) from None
    named = None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            named = _NamedWrites(f, target)
            yield named
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; nothing written here is a secret
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise with_path(err, target) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if named is not None and named.error is not None:  # e.g. torch.save's RuntimeError
            raise named.error from None
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def append_line(path: str | os.PathLike[str], line: str, durable: bool = False) -> None:
    """Append one line whole or not at all: if the write fails (a full disk), the file is cut
    back to its previous length, so no torn line is left for the next reader. `durable`:
    on disk (fsync) when this returns."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if durable:
                os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, size)
            raise with_path(err, path) from None
    finally:
        os.close(fd)


def remove_temp_leftovers(folder: str | os.PathLike[str], name: str = "",
                          suffixes: tuple[str, ...] = (TEMP_SUFFIX,)) -> tuple[int, int]:
    """Remove `.{name}.{random}.tmp` files and folders directly in `folder` (any name when
    `name` is empty): what a killed atomic write leaves behind. Only call it while no other
    writer of those names can be running (the folder's lock held, ...). Returns (entries
    removed, bytes freed)."""
    removed = freed = 0
    base = Path(folder)
    if not base.is_dir():
        return 0, 0
    prefix = f".{name}." if name else "."
    for entry in base.iterdir():
        if not (entry.name.startswith(prefix) and entry.name.endswith(suffixes)):
            continue
        freed += _size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed, freed


def _size(entry: Path) -> int:
    if entry.is_symlink() or not entry.is_dir():
        return entry.lstat().st_size
    return sum(p.lstat().st_size for p in entry.rglob("*"))


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on a folder (`FOLDER/.lock`, flock): held while the object is open,
    released when it is closed or the process dies (kill -9 included), so a stale lock never
    blocks anyone. The holder's pid is written into the file for the error message."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike[str], what: str = "run") -> None:
        import fcntl

        self.path = Path(folder) / self.NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self.fd)
            raise FolderLocked(f"{folder}: in use by another process (pid {holder or '?'}, "
                               f"lock {self.path}): one {what} per folder at a time") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
