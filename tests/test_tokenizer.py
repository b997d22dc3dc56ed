"""Tokenizer: V4 special tokens and ids, byte-level round trips, training, atomic save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.text.tokenizer import (
    BOS,
    DSML,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    byte_tokenizer,
    train_bpe,
)

TRICKY = [
    "",
    "plain ascii text",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "unicode: héllo wörld — 你好，世界 🎉👩‍👩‍👧 \u200b zero-width",
    "\x00\x01\x7f control bytes and \ufffd replacement",
    f"{BOS}inside{EOS} text <｜User｜>hi<｜Assistant｜><think>r</think>ok{EOS}",
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>",
    "ascii lookalike <|User|> and <|begin▁of▁sentence|> stay text",
]

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "for i in range(10):\n    print(i * i)\n" * 10,
    "Unicode 世界 and émigré café naïve résumé " * 10,
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(CORPUS * 5, vocab_size=340, show_progress=False)


def test_special_tokens_are_v4_strings_with_fixed_ids(trained: Tokenizer) -> None:
    assert SPECIAL_TOKENS[:3] == [BOS, EOS, PAD]
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"  # fullwidth bar, lower block
    assert EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)
    for needed in ("<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "<think>", "</think>",
                   "<｜action｜>", "<｜query｜>", "<｜read_url｜>", DSML):
        assert needed in SPECIAL_TOKENS
    for tok in (trained, byte_tokenizer()):
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_of_tricky_text(trained: Tokenizer, text: str) -> None:
    for tok in (trained, byte_tokenizer()):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_strings_in_text_encode_as_single_tokens(trained: Tokenizer) -> None:
    ids = trained.encode(f"a{BOS}b<think>c")
    assert 0 in ids and trained.token_to_id("<think>") in ids
    assert trained.encode(BOS) == [0]
    assert trained.encode(EOS) == [1]
    # The DSML prefix is one token; the rest of the tag is ordinary text.
    tag_ids = trained.encode("<｜DSML｜tool_calls>")
    assert trained.token_to_id(DSML) in tag_ids and len(tag_ids) >= 3
    # ASCII pipes are not the special token.
    assert 3 not in trained.encode("<|User|>")


def test_encode_adds_no_bos_or_eos(trained: Tokenizer) -> None:
    ids = trained.encode("hello")
    assert ids and trained.bos_id not in ids and trained.eos_id not in ids


def test_byte_tokenizer_is_one_token_per_byte() -> None:
    tok = byte_tokenizer()
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 256
    text = "héllo 🎉"
    assert len(tok.encode(text)) == len(text.encode("utf-8"))
    # Byte b has id len(SPECIAL_TOKENS) + b.
    assert tok.encode("A") == [len(SPECIAL_TOKENS) + ord("A")]


def test_training_learns_merges_and_exact_vocab_size(trained: Tokenizer) -> None:
    assert trained.vocab_size == 340
    text = "The quick brown fox jumps over the lazy dog."
    assert len(trained.encode(text)) < len(text.encode()) // 2


def test_training_covers_bytes_absent_from_corpus() -> None:
    tok = train_bpe(["aaaa bbbb"] * 10, vocab_size=300, show_progress=False)
    text = "zebra 🎉 \x00"
    assert tok.decode(tok.encode(text)) == text


def test_vocab_too_small_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["x"], vocab_size=100, show_progress=False)


def test_save_and_load_file_and_folder(tmp_path: Path, trained: Tokenizer) -> None:
    path = trained.save(tmp_path / "tok.json")
    assert path == tmp_path / "tok.json"
    folder = tmp_path / "run"
    folder.mkdir()
    assert trained.save(folder) == folder / "tokenizer.json"
    assert not [p for p in tmp_path.rglob("*.tmp")]
    for source in (path, folder):
        loaded = Tokenizer.from_file(source)
        assert loaded.vocab_size == trained.vocab_size
        for text in TRICKY:
            assert loaded.encode(text) == trained.encode(text)
    json.loads(path.read_text(encoding="utf-8"))  # plain tokenizer.json


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no such file"):
        Tokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_foreign_tokenizer_without_v4_specials_loads(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.encode("hello") == [0]
    assert tok.bos_id is None and tok.eos_id is None


def test_decode_rejects_out_of_range_ids(trained: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id 340"):
        trained.decode([1, 340])
