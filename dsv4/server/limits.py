"""What one client can make the server do: bounded bodies, bounded waits, well-formed JSON.

* The request body is read with a size limit (`max_body_bytes`, checked against
  Content-Length before reading and while reading) and a time limit (`body_timeout_s`): 413 and
  408, before any of it is parsed or tokenized.
* JSON that Python parses but no tokenizer can take is a 400 naming the field: strings holding
  lone surrogates (`"\\ud800"` is valid JSON syntax, not valid Unicode) and nesting deeper than
  `max_json_depth` (the decoder's own recursion error included).
* A connection must send a complete request head (request line and headers) within
  `header_timeout_s` of opening, or of its previous response: idle and slow-header connections
  are closed instead of being held forever (uvicorn's keep-alive timeout only starts after a
  first response, and any byte received cancels it).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from dsv4.server.protocol import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_DEPTH,
    APIError,
)


@dataclass
class ServerLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_score_tokens: int | None = None  # prompt scoring (echo + logprobs); None: the capacity


class ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


# ---- the body ---------------------------------------------------------------------------------
async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The whole body, or a 413 (too large) / 408 (too slow) before it is all in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(int(declared), limits)
    try:
        return await asyncio.wait_for(_bounded_body(request, limits), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within "
                       f"{limits.body_timeout_s:g} s", code="request_timeout") from None
    except ClientDisconnect:
        raise ClientGone from None


async def _bounded_body(request: Request, limits: ServerLimits) -> bytes:
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise _too_large(size, limits, at_least=True)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(size: int, limits: ServerLimits, at_least: bool = False) -> APIError:
    return APIError(413, f"the request body has {'more than ' if at_least else ''}{size:,} "
                    f"bytes; this server takes at most {limits.max_body_bytes:,} "
                    "(dsv4 serve --max-body-bytes)", code="request_too_large")


# ---- the JSON ---------------------------------------------------------------------------------
def parse_json(raw: bytes, limits: ServerLimits) -> Any:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}",
                       code="invalid_json") from None
    except RecursionError:
        raise _too_deep(limits) from None
    check_json_text(value, limits.max_json_depth)
    return value


def check_json_text(value: Any, max_depth: int) -> None:
    """400 for a string (or key) that is not valid Unicode, or nesting deeper than max_depth.
    Iterative: the check itself must not recurse as deep as the input."""
    pending: list[tuple[Any, str, int]] = [(value, "", 0)]
    while pending:
        item, path, depth = pending.pop()
        if isinstance(item, str):
            _check_unicode(item, path or "body")
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise _too_deep_at(path, max_depth)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_unicode(key, f"{path}.{key!r}" if path else repr(key))
                where = f"{path}[{key}]" if isinstance(item, list) else \
                    (f"{path}.{key}" if path else str(key))
                pending.append((child, where, depth + 1))


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code_point = ord(text[err.start])
        raise APIError(400, f"{where}: holds a lone surrogate \\u{code_point:04x} at "
                       f"character {err.start} (valid JSON escape, not valid Unicode)",
                       param=where.split(".")[0].split("[")[0] or None,
                       code="invalid_unicode") from None


def _too_deep(limits: ServerLimits) -> APIError:
    return APIError(400, f"the request body nests deeper than {limits.max_json_depth} levels",
                    code="invalid_json")


def _too_deep_at(path: str, max_depth: int) -> APIError:
    return APIError(400, f"{path or 'body'}: nested deeper than {max_depth} levels",
                    param=path.split(".")[0].split("[")[0] or None, code="invalid_json")


# ---- memory ---------------------------------------------------------------------------------
LARGE_BODY_BYTES = 2**20  # requests this big release their freed memory afterwards
MMAP_THRESHOLD_BYTES = 2**20  # buffers this big get their own mapping, unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to do
        return None


_LIBC = _libc()


def return_large_buffers() -> None:
    """Make glibc map every buffer of MMAP_THRESHOLD_BYTES or more on its own, for the whole
    process. By default glibc raises that threshold to the size of the largest block freed
    (up to 32 MiB), after which a 7 MB prompt string or a scoring buffer lands in a heap arena
    and stays resident: the server kept 1.1-1.3x its idle RSS after abusive requests, 1.07x
    with this (docs/LOG.md); decode speed was unchanged. A MALLOC_MMAP_THRESHOLD_ set in the
    environment wins. Call once at start, before the model is loaded."""
    if _LIBC is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Give freed heap memory back to the system. glibc keeps what a large request freed
    (parsed bodies, token lists, scoring buffers) inside the process, so without this the
    resident size after one big request stays near its peak; a trim costs milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# ---- the connection ---------------------------------------------------------------------------
class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections that do not send a complete request
    head within `header_timeout_s` (set by `bounded_protocol`)."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    closed_idle = 0  # connections closed for it, over all instances (for /health and tests)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._await_request_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_request_head()  # a kept-alive connection's next request: the same rule

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _await_request_head(self) -> None:
        self._cancel_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(
                self.header_timeout_s, self._head_overdue, self.cycle)

    def _head_overdue(self, cycle_then: object) -> None:
        # A complete request head starts a new cycle; the same cycle means none came.
        if self.cycle is cycle_then and not self.transport.is_closing():
            type(self).closed_idle += 1
            self.transport.close()

    def _cancel_head_deadline(self) -> None:
        if getattr(self, "_head_deadline", None) is not None:
            self._head_deadline.cancel()
            self._head_deadline = None


def bounded_protocol(header_timeout_s: float) -> type[BoundedH11Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"header_timeout_s": header_timeout_s})
