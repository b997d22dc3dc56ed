"""Data pipeline: reading corpora, the token store cache, packing invariants, exact resume."""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsv4.pretrain.data import (
    IGNORE_INDEX,
    CorpusReport,
    DataError,
    Document,
    PackedLoader,
    TokenStore,
    default_corpus_files,
    iter_documents,
    validation_batches,
)
from dsv4.text.tokenizer import byte_tokenizer


class WideTokenizer:
    """A stand-in with a vocabulary past 65536 (uint32 shards): one id per character."""

    vocab_size = 70000
    bos_id, eos_id, pad_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [66000 + ord(c) % 3000 for c in text]

    def fingerprint(self) -> str:
        return "wide-v1"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def test_default_corpus_is_this_interpreters_stdlib() -> None:
    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 200 and files == sorted(files)
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)
    assert root / "os.py" in files and root / "json" / "__init__.py" in files


def test_reads_every_format(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "plain text one")
    _write(tmp_path / "sub" / "deeper" / "b.py", "print('hi')\n")
    _write(tmp_path / "c.jsonl", '{"text": "line one"}\n\n{"text": "line two", "id": 7}\n')
    _write(tmp_path / "d.json", json.dumps([{"text": "array zero"}, {"text": "array one"}]))
    _write(tmp_path / "e.json", '{"text": "json lines in a .json"}\n')
    table = pa.table({"text": ["row zero", "row one", "row two"], "n": [0, 1, 2]})
    pq.write_table(table, tmp_path / "f.parquet")
    _write(tmp_path / ".hidden" / "skip.txt", "not walked")
    docs = list(iter_documents([tmp_path]))
    assert [d.text for d in docs] == [
        "plain text one", "line one", "line two", "array zero", "array one",
        "json lines in a .json", "row zero", "row one", "row two", "print('hi')\n"]
    sources = [d.source for d in docs]
    assert sources[1] == f"{tmp_path / 'c.jsonl'}:1" and sources[2] == f"{tmp_path / 'c.jsonl'}:3"
    assert sources[4] == f"{tmp_path / 'd.json'}#1" and sources[8] == f"{tmp_path / 'f.parquet'}#2"
    # a single file works too, and None is the default corpus
    assert [d.text for d in iter_documents([tmp_path / "a.txt"])] == ["plain text one"]
    first = next(iter_documents(None))
    assert first.source.endswith(".py") and "site-packages" not in first.source and first.text


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"nofield\.jsonl:2: no \"text\" field"),
    ("notstr.jsonl", '{"text": 5}\n', r"notstr\.jsonl:1: \"text\" must be a string"),
    ("arr.json", '[{"text": "a"}, {"txt": "b"}]', r"arr\.json#1: no \"text\" field"),
    ("broken.json", '[{"text": "a"},', r"broken\.json:1: invalid JSON"),
])
def test_bad_json_names_file_and_line(tmp_path: Path, name: str, content: str,
                                      message: str) -> None:
    _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        list(iter_documents([tmp_path / name]))


def test_bad_parquet_names_file_and_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol\.parquet: no \"text\" column.*body"):
        list(iter_documents([tmp_path / "nocol.parquet"]))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet#1: \"text\" must be a string"):
        list(iter_documents([tmp_path / "null.parquet"]))
    _write(tmp_path / "fake.parquet", "not parquet at all")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        list(iter_documents([tmp_path / "fake.parquet"]))


def test_missing_paths_and_binary_files(tmp_path: Path, caplog) -> None:
    with pytest.raises(DataError, match=r"nowhere\.txt: no such file or folder"):
        list(iter_documents([tmp_path / "nowhere.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no files"):
        list(iter_documents([tmp_path / "empty"]))
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x01\xff")
    with pytest.raises(DataError, match=r"blob\.bin: not a UTF-8 text file"):
        list(iter_documents([tmp_path / "blob.bin"]))
    # inside a walked folder: skipped, counted and reported, never silently
    _write(tmp_path / "mixed" / "good.txt", "good")
    (tmp_path / "mixed" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "mixed" / "img.png").write_bytes(b"\x89PNG\x00\x00")
    _write(tmp_path / "mixed" / "void.txt", "")
    report = CorpusReport()
    with caplog.at_level(logging.WARNING, logger="dsv4.data"):
        docs = list(iter_documents([tmp_path / "mixed"], report))
    assert [d.text for d in docs] == ["good"]
    assert sorted(Path(p).name for p in report.undecodable) == ["img.png", "latin1.txt"]
    assert report.empty == 1
    assert "2 binary or non-UTF-8 files skipped" in caplog.text
    assert "1 empty documents skipped" in caplog.text


# ---------------------------------------------------------------------------------------------
# Token store
# ---------------------------------------------------------------------------------------------


def _corpus(tmp_path: Path, n: int = 12) -> Path:
    folder = tmp_path / "corpus"
    for i in range(n):
        _write(folder / f"doc{i:02d}.txt", f"document {i} " * (i + 1))
    return folder


def test_store_holds_bos_tokens_eos_per_document(tmp_path: Path, tok) -> None:
    folder = _corpus(tmp_path)
    store = TokenStore.build([folder], tok, tmp_path / "cache", val_fraction=0.25,
                             progress=False)
    assert store.tokens.dtype == np.uint16 and isinstance(store.tokens, np.memmap)
    texts = [d.text for d in iter_documents([folder])]
    for i, text in enumerate(texts):
        assert store.document(i).tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]
    train, val = store.documents("train"), store.documents("val")
    assert len(val) == 3 and not set(train) & set(val) and len(train) + len(val) == len(texts)
    assert store.n_tokens("train") + store.n_tokens("val") == len(store.tokens)
    assert store.n_tokens("val") == sum(len(store.document(i)) for i in val)
    # the split is a fixed function of the corpus: a fresh build elsewhere picks the same docs
    again = TokenStore.build([folder], tok, tmp_path / "cache2", val_fraction=0.25,
                             progress=False)
    assert again.documents("val").tolist() == val.tolist()
    with pytest.raises(ValueError, match="split 'test'"):
        store.documents("test")


def test_store_uses_uint32_past_65536_ids(tmp_path: Path) -> None:
    docs = [Document("héllo", "a"), Document("wörld!", "b")]
    store = TokenStore.build(docs, WideTokenizer(), tmp_path, val_fraction=0.5, progress=False)
    assert store.tokens.dtype == np.uint32
    assert store.document(0).tolist() == [0, *WideTokenizer().encode("héllo"), 1]


def test_store_cache_is_reused_and_invalidated(tmp_path: Path, tok) -> None:
    folder = _corpus(tmp_path)
    cache = tmp_path / "cache"
    first = TokenStore.build([folder], tok, cache, progress=False)
    assert not first.reused
    second = TokenStore.build([folder], tok, cache, progress=False)
    assert second.reused and second.folder == first.folder
    # a changed file (size and mtime), a different tokenizer, a different split: rebuilt
    _write(folder / "doc03.txt", "changed content")
    changed = TokenStore.build([folder], tok, cache, progress=False)
    assert not changed.reused and changed.folder != first.folder
    assert changed.document(3).tolist()[1:-1] == tok.encode("changed content")
    other_tok = TokenStore.build([folder], WideTokenizer(), cache, progress=False)
    assert other_tok.folder not in (first.folder, changed.folder)
    other_split = TokenStore.build([folder], tok, cache, val_fraction=0.2, progress=False)
    assert other_split.folder not in (first.folder, changed.folder, other_tok.folder)
    # same mtime and size but a touched mtime still invalidates
    stat = (folder / "doc05.txt").stat()
    os.utime(folder / "doc05.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not TokenStore.build([folder], tok, cache, progress=False).reused
    # only finished stores are in the cache folder: no temporary leftovers
    assert all(p.name.startswith("tokens-") for p in cache.iterdir())


def test_failed_build_leaves_nothing_behind(tmp_path: Path, tok) -> None:
    class Exploding(WideTokenizer):
        calls = 0

        def encode(self, text: str) -> list[int]:
            Exploding.calls += 1
            if Exploding.calls == 3:
                raise RuntimeError("boom")
            return super().encode(text)

    docs = [Document(f"doc {i}", str(i)) for i in range(5)]
    with pytest.raises(RuntimeError, match="boom"):
        TokenStore.build(docs, Exploding(), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def _random_store(tmp_path: Path, seed: int, n_docs: int, max_len: int, tok) -> TokenStore:
    rng = np.random.default_rng(seed)
    docs = [Document("".join(rng.choice(list("abcdefgh \n"), size=int(length))), f"d{i}")
            for i, length in enumerate(rng.integers(1, max_len, size=n_docs))]
    return TokenStore.build(docs, tok, tmp_path / f"store{seed}", val_fraction=0.2,
                            progress=False)


def _segments(row_doc_ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal doc ids."""
    edges = np.flatnonzero(np.diff(row_doc_ids)) + 1
    bounds = [0, *edges.tolist(), len(row_doc_ids)]
    return list(zip(bounds[:-1], bounds[1:]))


def _check_packing(batches: list, store: TokenStore, align: int) -> list[list[int]]:
    """Assert the packing contract on consecutive batches; return the documents they hold,
    rebuilt from the pieces (continuations joined), in stream order."""
    docs: list[list[int]] = []
    open_doc: list[int] | None = None  # a document cut at the end of the previous row
    expected_next = None  # the target of the cut piece's last token
    for batch in batches:
        for ids, targets, doc_ids in zip(batch.input_ids.numpy(), batch.targets.numpy(),
                                         batch.doc_ids.numpy()):
            assert (np.diff(doc_ids) >= 0).all() and doc_ids[0] == 0
            segments = _segments(doc_ids)
            assert [doc_ids[s] for s, _ in segments] == list(range(len(segments)))
            for start, end in segments:
                piece, piece_targets = ids[start:end], targets[start:end]
                if open_doc is None and piece[0] == store.pad_id:  # a pad run
                    assert (piece == store.pad_id).all()
                    assert (piece_targets == IGNORE_INDEX).all()
                    assert end % align == 0 or end == len(ids)  # up to the next aligned start
                    continue
                assert start % align == 0  # every document piece starts aligned
                if open_doc is not None:  # the continuation of a cut document: position 0
                    assert start == 0 and piece[0] == expected_next
                    open_doc.extend(piece.tolist())
                else:
                    assert piece[0] == store.bos_id
                    open_doc = piece.tolist()
                assert (piece_targets[:-1] == piece[1:]).all()  # next token of the same doc
                if piece[-1] == store.eos_id and piece_targets[-1] == IGNORE_INDEX:
                    docs.append(open_doc)
                    open_doc = None
                else:  # cut by the row's end; its last target is the next row's first token
                    assert end == len(ids) and piece_targets[-1] != IGNORE_INDEX
                    expected_next = piece_targets[-1]
    return docs


@pytest.mark.parametrize("seed", range(12))
def test_packing_invariants_on_random_documents(tmp_path: Path, tok, seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    store = _random_store(tmp_path, seed, n_docs=int(rng.integers(5, 25)),
                          max_len=int(rng.choice([20, 150, 700])), tok=tok)
    align = int(rng.choice([1, 4, 16, 128]))
    seq_len = int(rng.choice([16, 100, 128, 300, 512]))
    batch_size = int(rng.integers(1, 4))
    loader = PackedLoader(store, "train", batch_size, seq_len, seed=seed, align=align)
    train_docs = store.documents("train")
    epoch_tokens = store.n_tokens("train")
    n_batches = 2 * epoch_tokens // (batch_size * seq_len) + 3  # past one epoch
    batches = [loader.next_batch() for _ in range(n_batches)]
    for b in batches:
        assert b.input_ids.shape == b.targets.shape == b.doc_ids.shape == (batch_size, seq_len)
        assert b.input_ids.dtype == b.targets.dtype == b.doc_ids.dtype == torch.long
    docs = _check_packing(batches, store, align)
    # the first epoch is every training document exactly once, in a shuffled order
    first_epoch = docs[: len(train_docs)]
    expected = {tuple(store.document(i).tolist()) for i in train_docs}
    assert {tuple(d) for d in first_epoch} == expected


def test_each_document_starts_aligned_with_pads_between(tmp_path: Path, tok) -> None:
    docs = [Document("x" * n, str(n)) for n in (3, 200, 10, 1)]  # 5, 202, 12, 3 tokens
    store = TokenStore.build(docs, tok, tmp_path, val_fraction=0.0, progress=False)
    loader = PackedLoader(store, "train", 1, 256, align=128, shuffle=False)
    row = loader.next_batch()
    ids, targets, doc_ids = row.input_ids[0], row.targets[0], row.doc_ids[0]
    # doc 0 at 0..4, pad 5..127, doc 1 at 128..255 (cut: 128 of its 202 tokens)
    assert ids[0] == tok.bos_id and ids[4] == tok.eos_id and targets[4] == IGNORE_INDEX
    assert (ids[5:128] == tok.pad_id).all() and (targets[5:128] == IGNORE_INDEX).all()
    assert ids[128] == tok.bos_id and targets[255] == tok.encode("x")[0]  # cut: next token
    assert doc_ids[0] == 0 and doc_ids[5] == 1 and doc_ids[128] == 2 and doc_ids[255] == 2
    nxt = loader.next_batch()
    # the rest of doc 1 (74 tokens) continues at position 0, then doc 2 at 128, doc 3 at ...
    assert nxt.input_ids[0, 0] != tok.bos_id and nxt.input_ids[0, 73] == tok.eos_id
    assert nxt.input_ids[0, 128] == tok.bos_id and nxt.input_ids[0, 139] == tok.eos_id


def test_ranks_get_disjoint_shares(tmp_path: Path, tok) -> None:
    store = _random_store(tmp_path, 7, n_docs=30, max_len=60, tok=tok)
    shares = []
    for rank in range(3):
        loader = PackedLoader(store, "train", 2, 64, seed=3, align=16, rank=rank,
                              world_size=3, shuffle=True, epochs=1)
        docs = _check_packing(list(loader), store, 16)
        shares.append({tuple(d) for d in docs})
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2])
    assert not (shares[0] & shares[2])
    assert set().union(*shares) == {tuple(store.document(i).tolist())
                                    for i in store.documents("train")}
    with pytest.raises(ValueError, match="rank=3"):
        PackedLoader(store, "train", 2, 64, rank=3, world_size=3)


def test_shuffle_depends_on_seed_and_epoch(tmp_path: Path, tok) -> None:
    store = _random_store(tmp_path, 8, n_docs=40, max_len=30, tok=tok)

    def first_tokens(seed: int, epochs: int = 1) -> list[int]:
        loader = PackedLoader(store, "train", 4, 32, seed=seed, align=32, epochs=epochs)
        return [b.input_ids[:, 1].tolist() for b in loader]

    assert first_tokens(0) == first_tokens(0)
    assert first_tokens(0) != first_tokens(1)
    two = first_tokens(0, epochs=2)
    half = len(two) // 2
    assert two[:half] != two[half:]  # epoch 2 is reshuffled


def test_exact_resume(tmp_path: Path, tok) -> None:
    store = _random_store(tmp_path, 9, n_docs=15, max_len=300, tok=tok)
    loader = PackedLoader(store, "train", 3, 100, seed=5, align=16)
    for _ in range(7):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON
    expected = [loader.next_batch() for _ in range(25)]  # crosses epoch boundaries
    resumed = PackedLoader(store, "train", 3, 100, seed=5, align=16)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.targets, want.targets)
        assert torch.equal(got.doc_ids, want.doc_ids)
    with pytest.raises(ValueError, match="seed=5.*seed=6"):
        PackedLoader(store, "train", 3, 100, seed=6, align=16).load_state_dict(state)


def test_validation_batches_are_fixed_and_cover_every_token_once(tmp_path: Path, tok) -> None:
    store = _random_store(tmp_path, 10, n_docs=60, max_len=200, tok=tok)
    batches = validation_batches(store, 4, 128, align=16)
    again = validation_batches(store, 4, 128, align=16)
    assert len(batches) == len(again) > 1
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again))
    n_targets = sum(b.n_target_tokens for b in batches)
    assert n_targets == store.n_tokens("val") - store.n_documents("val")  # all but each EOS
    docs = _check_packing(batches, store, 16)
    assert sorted(map(tuple, docs)) == sorted(tuple(store.document(i).tolist())
                                              for i in store.documents("val"))
    # ranks: disjoint, all tokens, same number of batches everywhere
    per_rank = [validation_batches(store, 2, 128, align=16, rank=r, world_size=2)
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sum(b.n_target_tokens for bs in per_rank for b in bs) == n_targets
    capped = validation_batches(store, 4, 128, align=16, max_batches=1)
    assert len(capped) == 1 and torch.equal(capped[0].input_ids, batches[0].input_ids)


def test_loader_errors(tmp_path: Path, tok) -> None:
    store = TokenStore.build([Document("only one", "a")], tok, tmp_path, progress=False)
    assert store.n_tokens("val") == 0
    with pytest.raises(DataError, match="split 'val' has 0 documents"):
        PackedLoader(store, "val", 1, 16)
    with pytest.raises(ValueError, match="seq_len=0"):
        PackedLoader(store, "train", 1, 0)
    with pytest.raises(ValueError, match="val_fraction=1"):
        TokenStore.build([Document("x", "a")], tok, tmp_path, val_fraction=1)
