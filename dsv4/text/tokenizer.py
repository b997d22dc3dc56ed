"""Tokenizers: V4's special tokens, loading any `tokenizer.json`, training a byte-level BPE.

DeepSeek-V4 uses V3's byte-level BPE (the released `tokenizer.json`): BOS
`<｜begin▁of▁sentence｜>` is id 0, EOS `<｜end▁of▁sentence｜>` id 1. The special strings use the
fullwidth bar "｜" (U+FF5C) and "▁" (U+2581). A tokenizer trained here puts `SPECIAL_TOKENS`
first, in list order (BOS 0, EOS 1, PAD 2 as in V3), then the 256 byte tokens, then the merges.

Decision on DSML: the tool-call markup `<｜DSML｜tool_calls>`, `<｜DSML｜invoke name="...">`,
`<｜DSML｜parameter ...>` is spelled with a prefix, not with whole-tag tokens, so the prefix
`｜DSML｜` is ONE special token and the rest of each tag (`<`, `tool_calls>`, `invoke name=`,
...) is ordinary text. A tag then costs a few tokens but its attributes stay free-form, and a
user typing a lookalike with ASCII pipes gets ordinary text.

The chat encoding (turns, thinking, tool calls) lives in `dsv4/text/chat.py`; this module only maps
text <-> ids. `encode` adds no BOS/EOS; special-token strings inside the text become their ids.
`encode_plain` is for text that came from a user, a tool or a document: it never produces a
special-token id (see its docstring); chat prompts are built with it (`text.chat.encode_chat_ids`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from dsv4.errors import Error
from dsv4.files import atomic_write

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"  # V3's pad string (id 2 there too)
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"  # prefix of the tool-call tags, see the module docstring
# Quick-instruction task tokens (`encoding_dsv4.py`; `extracted_url` is in the V4 report's table).
TASK_TOKENS = [
    "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>",
    "<｜read_url｜>", "<｜extracted_url｜>",
]

# Order fixes the ids of every tokenizer trained here: BOS 0, EOS 1, PAD 2, then the rest.
SPECIAL_TOKENS: list[str] = [
    BOS, EOS, PAD, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML, *TASK_TOKENS,
]


class TokenizerError(Error, ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the one `ByteLevel` uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _special(token: str) -> AddedToken:
    # normalized=False: matched on the raw text; special=True: never split by the BPE.
    return AddedToken(token, special=True, normalized=False, single_word=False,
                      lstrip=False, rstrip=False)


def _byte_level(tok: HFTokenizer) -> HFTokenizer:
    # add_prefix_space=False: "a b" and " b" tokenize the way the text is written (V3 style);
    # decode(encode(text)) == text for any string.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A `tokenizers.Tokenizer` with V4's special-token ids at hand.

    `bos_id`, `eos_id`, `pad_id` are None only for a foreign tokenizer.json that lacks those
    strings; every tokenizer built by this module has them (0, 1, 2).
    """

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.hf = tokenizer
        self.bos_id: int | None = tokenizer.token_to_id(BOS)
        self.eos_id: int | None = tokenizer.token_to_id(EOS)
        self.pad_id: int | None = tokenizer.token_to_id(PAD)
        self._plain: HFTokenizer | None = None  # built on first use by `encode_plain`

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding needs at least this many rows)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a `tokenizer.json`, or the `tokenizer.json` inside a folder."""
        target = Path(path)
        if target.is_dir():
            target = target / "tokenizer.json"
        if not target.is_file():
            raise TokenizerError(f"{target}: no such file")
        try:
            return cls(HFTokenizer.from_file(str(target)))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{target}: not a valid tokenizer.json: {err}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `tokenizer.json` atomically; a folder gets `folder/tokenizer.json`."""
        target = Path(path)
        if target.is_dir():
            target = target / "tokenizer.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as f:
            f.write(self.hf.to_str())
        return target

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added; special-token strings map to their ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: the added vocabulary (special and markup tokens
        such as `<｜User｜>`, `</think>`, `｜DSML｜`) is not matched, so those strings become
        ordinary BPE pieces. This is how DeepSeek's encoder tokenizes message text, and what
        keeps a message from forging turn boundaries, EOS or `</think>`. (`tokenizers`'
        `encode_special_tokens` is not enough: most V4 markup tokens are not flagged special.)
        """
        if self._plain is None:
            self._plain = self._without_added_tokens()
        return self._plain.encode(text, add_special_tokens=False).ids

    def _without_added_tokens(self) -> HFTokenizer:
        # The same model, normalizer and pre-tokenizer, minus the added-token matcher.
        spec = json.loads(self.hf.to_str())
        spec["added_tokens"] = []
        spec["post_processor"] = None
        return HFTokenizer.from_str(json.dumps(spec))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included verbatim (so decode(encode(t)) == t)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(size {self.vocab_size})")
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)


def byte_tokenizer() -> Tokenizer:
    """Specials (ids 0..len-1) + the 256 byte tokens, no merges: works with no training data."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = len(SPECIAL_TOKENS) + byte
    tok = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    return Tokenizer(tok)


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE on `texts` with `vocab_size` ids in all (specials included);
    fewer when the corpus runs out of pairs to merge.

    Ids: `SPECIAL_TOKENS` first (BOS 0, EOS 1, PAD 2, ...), then all 256 bytes, then merges, so
    any text round-trips even if the corpus never showed some byte.
    """
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {floor} "
                         f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tok = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_special(t) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
