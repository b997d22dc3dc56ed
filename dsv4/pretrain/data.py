"""Corpora -> token shards -> packed batches.

1. `iter_documents(paths)`: text files, JSON lines / JSON arrays and Parquet files, or folders
   of them, as `Document(text, source)`. No paths: the embedded default corpus, the Python
   standard library source of the running interpreter (real text, on every machine, no download).
2. `TokenStore.build(paths, tokenizer, cache_dir)`: every document is tokenized once, as
   `[BOS] + tokens + [EOS]`, into one memory-mapped token file (uint16 when the vocabulary fits,
   else uint32) with document offsets, in a cache folder named by a fingerprint of the inputs
   (file names, sizes, mtimes), the tokenizer and the split; a later build with the same
   fingerprint reuses it. Documents are split into train / validation deterministically.
3. `PackedLoader(store, split, batch_size, seq_len)`: packed sequences for sample-level attention
   masking (V4 trains with no cross-document attention). The packing contract the model relies on:
   - every document is `[BOS] + tokens + [EOS]` and starts at a position that is a multiple of
     `align` (128: the HCA compression block, a multiple of the CSA block 4, so no compressed
     entry ever pools two documents);
   - the gap before an aligned start is `pad_id` tokens with target -100 and their own doc id;
   - `targets[t]` is the document's next token, -100 at its last token (EOS);
   - a document longer than what is left of a sequence continues at position 0 of the next
     sequence (the model sees the continuation as a new document);
   - `doc_ids` number the segments (documents and pad runs) of a sequence 0, 1, 2, ... so they
     are non-decreasing along the sequence.
   Documents are shuffled per epoch with the seed; with `rank / world_size` each rank packs a
   disjoint share. `state_dict()` / `load_state_dict()` resume exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dsv4.errors import Error
from dsv4.files import with_path

log = logging.getLogger("dsv4.data")

IGNORE_INDEX = -100  # targets the loss skips (torch's cross_entropy default)
STORE_FORMAT = 1  # bump when the cache layout changes: old caches are then rebuilt
TEXT_SUFFIXES_JSON = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(Error, ValueError):
    """Unusable corpus input; the message names the file (and line or row)."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path", "path:line" (JSON lines) or "path#row" (Parquet, JSON arrays)


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def default_corpus_root() -> Path:
    """The standard library folder of the running interpreter (sysconfig "stdlib")."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The Python standard library `*.py` files of the running interpreter, sorted.

    Third-party packages (`site-packages`, `dist-packages`) are excluded even when a
    distribution installs them under the stdlib folder, so the corpus is the same for every
    interpreter of one Python version.
    """
    root = default_corpus_root()
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not excluded.intersection(p.relative_to(root).parts))


@dataclass
class CorpusReport:
    """What reading a corpus skipped, so it is reported instead of silently dropped."""

    undecodable: list[str] = field(default_factory=list)  # binary / non-UTF-8 files in folders
    empty: int = 0  # documents with empty text (they would only be [BOS, EOS])

    def summary(self) -> str:
        parts = []
        if self.undecodable:
            shown = ", ".join(self.undecodable[:3]) + (" ..." if len(self.undecodable) > 3 else "")
            parts.append(f"{len(self.undecodable)} binary or non-UTF-8 files skipped ({shown})")
        if self.empty:
            parts.append(f"{self.empty} empty documents skipped")
        return "; ".join(parts)


def corpus_files(paths: Sequence[str | os.PathLike[str]] | None) -> list[tuple[Path, bool]]:
    """Resolve files and folders (recursively, sorted) to (file, given_explicitly) pairs.

    None: the default corpus (treated like a walked folder). Hidden files and folders
    (names starting with ".") and `__pycache__` are not walked into. A missing path raises.
    """
    if paths is None:
        return [(p, False) for p in default_corpus_files()]
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given (pass files or folders, or None for the default "
                        "corpus)")
    files: list[tuple[Path, bool]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append((path, True))
        elif path.is_dir():
            walked = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") or part == "__pycache__"
                for part in p.relative_to(path).parts))
            if not walked:
                raise DataError(f"{path}: folder holds no files")
            files.extend((p, False) for p in walked)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def iter_documents(paths: Sequence[str | os.PathLike[str]] | None,
                   report: CorpusReport | None = None) -> Iterator[Document]:
    """Documents of files and folders; None: the default corpus (stdlib source).

    `.jsonl` / `.json`: one JSON object per line with a "text" field (a `.json` file may also be
    one array of such objects); `.parquet`: a "text" column; anything else: a UTF-8 text file,
    one document per file. Bad input raises `DataError` naming the file and line. A binary or
    non-UTF-8 file met while walking a folder is skipped and counted in `report` (a warning is
    logged at the end); given explicitly, it raises. Empty texts are skipped and counted.
    """
    report = report if report is not None else CorpusReport()
    for path, explicit in corpus_files(paths):
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES_JSON:
            docs = _read_json_documents(path)
        elif suffix in PARQUET_SUFFIXES:
            docs = _read_parquet_documents(path)
        else:
            text = _read_text_file(path, explicit)
            if text is None:
                report.undecodable.append(str(path))
                continue
            docs = iter([Document(text, str(path))])
        found = False
        for doc in docs:
            if doc.text:
                found = True
                yield doc
            else:
                report.empty += 1
        if explicit and not found:  # named on purpose, yet nothing in it: a mistake
            raise DataError(f"{path}: holds no text (an empty file or only empty documents)")
    if report.summary():
        log.warning("corpus: %s", report.summary())


def _read_text_file(path: Path, explicit: bool) -> str | None:
    """UTF-8 text of a file; None for a binary/undecodable file found by walking a folder."""
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1,
                                     "NUL byte: a binary file")
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if explicit:
            raise DataError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})"
                            ) from None
        return None


def _text_of(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a \"text\" field, "
                        f"got {type(record).__name__}")
    if "text" not in record:
        raise DataError(f"{where}: no \"text\" field (keys: {sorted(record)[:8]})")
    if not isinstance(record["text"], str):
        raise DataError(f"{where}: \"text\" must be a string, got "
                        f"{type(record['text']).__name__}")
    return record["text"]


def _read_json_documents(path: Path) -> Iterator[Document]:
    """`.json`: one JSON value (an array of objects, or one object, pretty-printed or not),
    else JSON Lines; `.jsonl`: JSON Lines. Errors name the line (and the byte for UTF-8)."""
    if path.suffix.lower() == ".json":
        records = _whole_json(path)
        if records is not None:
            for i, record in enumerate(records):
                yield Document(_text_of(record, f"{path}#{i}"), f"{path}#{i}")
            return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 (byte {err.start} of the line: "
                                f"{err.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg}") from None
            yield Document(_text_of(record, where), where)


def _whole_json(path: Path) -> list[Any] | None:
    """The records of a `.json` file holding one JSON value; None if it holds several
    (JSON Lines under a .json name)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {err.start}: {err.reason})") from None
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one value: JSON Lines
            return None
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    return value if isinstance(value, list) else [value]


def _read_parquet_documents(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    columns = table.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{path}: no \"text\" column (columns: {columns})")
    row = 0
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{path}#{row}: \"text\" must be a string, got "
                                f"{type(text).__name__}")
            yield Document(text, f"{path}#{row}")
            row += 1


# ---------------------------------------------------------------------------------------------
# Token store: tokenize once, memory-map afterwards
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the ids: the full tokenizer.json when there is one."""
    if hasattr(tokenizer, "hf") and hasattr(tokenizer.hf, "to_str"):
        blob = tokenizer.hf.to_str()
    elif hasattr(tokenizer, "fingerprint"):
        blob = str(tokenizer.fingerprint())
    else:
        raise TypeError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: it needs "
                        "an `hf` tokenizers.Tokenizer or a fingerprint() method")
    return hashlib.sha256(blob.encode()).hexdigest()


def _sources_fingerprint(files: list[tuple[Path, bool]]) -> list[list[Any]]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p, _ in files]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class TokenStore:
    """Tokenized documents in a cache folder: `tokens.bin` (all documents, each
    `[BOS] + tokens + [EOS]`, back to back), `offsets.npy` (int64 [n_docs + 1]), `val.npy`
    (indices of the validation documents) and `meta.json`.

    `store.documents(split)`: indices of a split's documents; `store.document(i)`: its tokens
    (a memory-mapped view); `store.reused`: whether `build` found the cache already there.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.folder}: not a token store (no meta.json)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != STORE_FORMAT:
            raise DataError(f"{self.folder}: token store format {self.meta.get('format')}, "
                            f"expected {STORE_FORMAT}")
        self.offsets = np.load(self.folder / "offsets.npy")
        n_tokens = int(self.offsets[-1])
        dtype = np.dtype(self.meta["dtype"])
        # np.memmap cannot map an empty file; an empty corpus is rejected by build anyway.
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=dtype, mode="r",
                                shape=(n_tokens,))
        is_val = np.zeros(len(self.offsets) - 1, dtype=bool)
        is_val[np.load(self.folder / "val.npy")] = True
        self._split_docs = {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}
        self.reused = False

    # -- properties of the stored corpus --------------------------------------------------
    @property
    def bos_id(self) -> int:
        return int(self.meta["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def documents(self, split: str) -> np.ndarray:
        if split not in self._split_docs:
            raise ValueError(f"split {split!r}: must be 'train' or 'val'")
        return self._split_docs[split]

    def document(self, index: int) -> np.ndarray:
        """Tokens of document `index`, BOS and EOS included: a read-only memmap view."""
        return self.tokens[self.offsets[index]: self.offsets[index + 1]]

    def doc_lengths(self, split: str) -> np.ndarray:
        docs = self.documents(split)
        return (self.offsets[docs + 1] - self.offsets[docs]).astype(np.int64)

    def n_tokens(self, split: str) -> int:
        """Tokens of a split, BOS and EOS included."""
        return int(self.doc_lengths(split).sum())

    def n_documents(self, split: str) -> int:
        return len(self.documents(split))

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(cls, documents: Sequence[str | os.PathLike[str]] | Iterable[Document] | None,
              tokenizer: Any, cache_dir: str | os.PathLike[str], val_fraction: float = 0.01,
              progress: bool = True) -> TokenStore:
        """The store of a corpus, built once and reused while its fingerprint holds.

        `documents`: file/folder paths or None (the default corpus), fingerprinted by file
        names, sizes and mtimes (no reading); or an iterable of `Document`, fingerprinted by
        content. The fingerprint also covers the tokenizer, `val_fraction` and the format.
        The store is written into a temporary folder and renamed into place (atomic).
        """
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
        for name in ("bos_id", "eos_id", "pad_id"):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"tokenizer has no {name}: packing needs BOS, EOS and PAD")
        key: dict[str, Any] = dict(format=STORE_FORMAT, val_fraction=val_fraction,
                                   tokenizer=tokenizer_fingerprint(tokenizer))
        if documents is None or _is_path_list(documents):
            files = corpus_files(documents)
            key["files"] = _sources_fingerprint(files)
            doc_source: Iterable[Document] = iter_documents(documents)
            total_bytes: int | None = sum(p.stat().st_size for p, _ in files)
        else:
            doc_source = list(documents)
            digest = hashlib.sha256()
            for doc in doc_source:
                digest.update(doc.text.encode())
                digest.update(b"\x00")
            key["content"] = digest.hexdigest()
            total_bytes = None
        fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(cache_dir) / f"tokens-{fingerprint}"
        if (folder / "meta.json").is_file():
            store = cls(folder)
            store.reused = True
            return store
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            try:
                _write_store(tmp, doc_source, tokenizer, val_fraction, total_bytes, progress)
            except OSError as err:  # a full disk: name the store, not a temporary file
                raise with_path(err, folder) from None
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same store first: use theirs
                if not (folder / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(folder)


def _is_path_list(documents: Any) -> bool:
    if isinstance(documents, (str, os.PathLike)):
        return True
    return isinstance(documents, (list, tuple)) and all(
        isinstance(d, (str, os.PathLike)) for d in documents)


def _write_store(folder: Path, documents: Iterable[Document], tokenizer: Any,
                 val_fraction: float, total_bytes: int | None, progress: bool) -> None:
    """Tokenize `documents` into `folder` (a fresh temporary folder)."""
    dtype = _token_dtype(tokenizer.vocab_size)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    offsets = [0]
    encode_batch = getattr(tokenizer, "encode_batch", None) or (
        lambda texts: [tokenizer.encode(t) for t in texts])
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress)
    with (folder / "tokens.bin").open("wb") as out:
        for chunk in _chunks(documents, 64):
            for ids in encode_batch([d.text for d in chunk]):
                tokens = np.asarray([bos, *ids, eos], dtype=np.int64)
                if tokens.max() >= tokenizer.vocab_size or tokens.min() < 0:
                    raise DataError(f"tokenizer produced id {int(tokens.max())} outside its "
                                    f"vocabulary of {tokenizer.vocab_size}")
                out.write(tokens.astype(dtype).tobytes())
                offsets.append(offsets[-1] + len(tokens))
            bar.update(sum(len(d.text.encode()) for d in chunk))
        out.flush()
        os.fsync(out.fileno())
    bar.close()
    n_docs = len(offsets) - 1
    if n_docs == 0:
        raise DataError("the corpus holds no documents")
    np.save(folder / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(folder / "val.npy", validation_documents(n_docs, val_fraction))
    meta = dict(format=STORE_FORMAT, dtype=dtype.name, vocab_size=tokenizer.vocab_size,
                bos_id=bos, eos_id=eos, pad_id=tokenizer.pad_id, n_documents=n_docs,
                n_tokens=offsets[-1], val_fraction=val_fraction)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _chunks(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def validation_documents(n_docs: int, val_fraction: float) -> np.ndarray:
    """Indices of the validation documents: a fixed pseudo-random choice (seed 0), at least one
    when val_fraction > 0 and there are two documents or more, never all of them."""
    if val_fraction == 0 or n_docs < 2:
        return np.zeros(0, dtype=np.int64)
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    return np.sort(np.random.default_rng(0).permutation(n_docs)[:n_val]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] long
    targets: torch.Tensor  # [B, S] long, IGNORE_INDEX (-100) where there is nothing to predict
    doc_ids: torch.Tensor  # [B, S] long, segment number within each row, non-decreasing

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True)
                       for t in (self.input_ids, self.targets, self.doc_ids)))

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


class PackedLoader:
    """Packed [B, seq_len] batches from one split of a `TokenStore` (see the module docstring
    for the packing contract). The stream is endless: documents are reshuffled every epoch
    (seed + epoch) unless `shuffle=False`; rank r of `world_size` packs the documents at
    positions r, r + world_size, ... of each epoch's order. `epochs`: stop after that many
    passes (the last row is completed with padding; `next_batch` then raises StopIteration).
    """

    def __init__(self, store: TokenStore, split: str, batch_size: int, seq_len: int,
                 seed: int = 0, align: int = 128, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, epochs: int | None = None) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("align", align),
                            ("world_size", world_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
        self.store, self.split = store, split
        self.batch_size, self.seq_len, self.align = batch_size, seq_len, align
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epochs = epochs
        self.docs = store.documents(split)
        if len(self.docs) < world_size:
            raise DataError(f"split {split!r} has {len(self.docs)} documents, fewer than "
                            f"world_size={world_size} ranks (add data or change val_fraction)")
        # position in the stream: epoch, index into this rank's order, tokens of it consumed
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Store indices of this rank's documents for `epoch`, in packing order."""
        order = self.docs
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = order[rng.permutation(len(order))]
        return order[self.rank:: self.world_size]

    def _advance_document(self) -> None:
        self.cursor, self.offset = self.cursor + 1, 0
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)

    def _pack_row(self, ids: np.ndarray, targets: np.ndarray, doc_ids: np.ndarray) -> None:
        """Fill one row (arrays of length seq_len, ids pre-filled with pad, targets -100)."""
        pos, segment = 0, 0
        while pos < self.seq_len:
            if self.exhausted:  # finite stream ended: the rest of the row is one pad run
                doc_ids[pos:] = segment
                return
            if pos % self.align:  # pad run up to the next aligned start (or the row's end)
                end = min(pos + self.align - pos % self.align, self.seq_len)
                doc_ids[pos:end] = segment
                segment, pos = segment + 1, end
                continue
            doc = self.store.document(self._order[self.cursor])
            take = min(len(doc) - self.offset, self.seq_len - pos)
            piece = doc[self.offset: self.offset + take + 1].astype(np.int64)  # +1: last target
            ids[pos: pos + take] = piece[:take]
            targets[pos: pos + len(piece) - 1] = piece[1:]  # EOS keeps -100
            doc_ids[pos: pos + take] = segment
            segment, pos = segment + 1, pos + take
            self.offset += take
            if self.offset == len(doc):
                self._advance_document()

    @property
    def exhausted(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def next_batch(self) -> Batch:
        """The next [batch_size, seq_len] batch of this rank's stream."""
        if self.exhausted:
            raise StopIteration(f"{self.split} stream ended after {self.epochs} epoch(s)")
        shape = (self.batch_size, self.seq_len)
        ids = np.full(shape, self.store.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.zeros(shape, dtype=np.int64)
        for row in range(self.batch_size):
            self._pack_row(ids[row], targets[row], doc_ids[row])
        return Batch(torch.from_numpy(ids), torch.from_numpy(targets), torch.from_numpy(doc_ids))

    def __iter__(self) -> Iterator[Batch]:
        while not self.exhausted:
            yield self.next_batch()

    # -- exact resume ----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return dict(split=self.split, batch_size=self.batch_size, seq_len=self.seq_len,
                    seed=self.seed, align=self.align, rank=self.rank,
                    world_size=self.world_size, shuffle=self.shuffle, epochs=self.epochs,
                    n_documents=len(self.docs))

    def state_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, cursor=self.cursor, offset=self.offset, **self._config())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken. The loader's settings must match."""
        for key, value in self._config().items():
            if key in ("batch_size",):  # the stream does not depend on the batch size
                continue
            if state.get(key) != value:
                raise ValueError(f"data loader state has {key}={state.get(key)!r}, this loader "
                                 f"has {key}={value!r}")
        self.epoch, self.cursor, self.offset = (int(state[k])
                                                for k in ("epoch", "cursor", "offset"))
        self._order = self._epoch_order(self.epoch)


def validation_batches(store: TokenStore, batch_size: int, seq_len: int, align: int = 128,
                       rank: int = 0, world_size: int = 1,
                       max_batches: int | None = None) -> list[Batch]:
    """A fixed set of validation batches: one pass over this rank's validation documents in
    store order (no shuffle), every token once. The last batch is completed with all-pad rows
    (targets -100). Every rank gets the same number of batches (the largest rank's count;
    every rank packs every rank's share, which is cheap for a validation split), so
    distributed evaluation never waits on a rank that ran out. At most `max_batches`."""
    limit = None if max_batches is None else max_batches * batch_size

    def rows_of(r: int) -> list[Batch]:  # rank r's rows, at most `limit` of them
        loader = PackedLoader(store, "val", 1, seq_len, align=align, rank=r,
                              world_size=world_size, shuffle=False, epochs=1)
        return list(itertools.islice(loader, limit))

    mine = rows_of(rank)
    n_rows = max([len(mine)] + [len(rows_of(r)) for r in range(world_size) if r != rank])
    n_batches = -(-n_rows // batch_size)
    pad_row = Batch(torch.full((1, seq_len), store.pad_id, dtype=torch.long),
                    torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long),
                    torch.zeros((1, seq_len), dtype=torch.long))
    rows = (mine + [pad_row] * (n_batches * batch_size))[: n_batches * batch_size]
    return [Batch(*(torch.cat([getattr(r, f) for r in rows[i: i + batch_size]])
                    for f in ("input_ids", "targets", "doc_ids")))
            for i in range(0, len(rows), batch_size)]


def packing_stats(loader: PackedLoader, n_batches: int) -> dict[str, float]:
    """Share of positions that are padding, and of positions with a target, over n batches."""
    pad = target = total = 0
    for _ in range(n_batches):
        batch = loader.next_batch()
        total += batch.input_ids.numel()
        target += batch.n_target_tokens
        pad += int(((batch.targets == IGNORE_INDEX)
                    & (batch.input_ids == loader.store.pad_id)).sum())
    return dict(pad_fraction=pad / total, target_fraction=target / total, positions=total)


def _main(argv: Sequence[str] | None = None) -> None:
    """`python -m dsv4.pretrain.data`: build (or reuse) the default-corpus store, print packing."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dsv4.pretrain.data",
        description="Build (or reuse) the token store of a corpus and print its size and the "
                    "padding overhead of packing (documents start at multiples of 128).")
    parser.add_argument("--data", nargs="*", default=None, help="files or folders (default: "
                        "the Python standard library of this interpreter)")
    parser.add_argument("--vocab", type=int, default=4096,
                        help="vocabulary of the byte-level BPE trained on the corpus (4096: "
                             "the nano preset's)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "dsv4-data"),
                        help="cache folder for the tokenizer and the token store")
    parser.add_argument("--seq-len", type=int, default=1024, help="packed sequence length")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches to measure (default: one epoch of the train split)")
    args = parser.parse_args(argv)
    from dsv4.text.tokenizer import Tokenizer, train_bpe

    cache = Path(args.cache)
    tok_path = cache / f"bpe-{args.vocab}.json"
    if tok_path.is_file() and args.data is None:
        tokenizer = Tokenizer.from_file(tok_path)
    else:
        tokenizer = train_bpe((d.text for d in iter_documents(args.data)), args.vocab)
        if args.data is None:
            tokenizer.save(tok_path)
    store = TokenStore.build(args.data, tokenizer, cache)
    print(f"store {store.folder} ({'reused' if store.reused else 'built'}): "
          f"{store.meta['n_documents']} documents, train {store.n_tokens('train'):,} tokens, "
          f"val {store.n_tokens('val'):,} tokens ({store.n_documents('val')} documents)")
    loader = PackedLoader(store, "train", args.batch_size, args.seq_len)
    n_batches = args.batches or -(-store.n_tokens("train") // (args.batch_size * args.seq_len))
    stats = packing_stats(loader, n_batches)
    print(f"packing seq_len={args.seq_len} align=128: padding {stats['pad_fraction']:.2%} of "
          f"positions, targets on {stats['target_fraction']:.2%} "
          f"({stats['positions']:,} positions)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    _main()
