"""Perplexity and bits-per-byte, scored through the compressed KV cache at long context.

Method (local models). A document is `[BOS] + tokens`; every text token is scored (EOS is not
appended: bits-per-byte counts the text's bytes only). Its tokens are fed through
`forward_step` in chunks of `chunk` tokens, as a prefill with logits at every position, so the
cost stays linear in length (window + top-k + length/128 keys per query) and a document of
`context` tokens is scored at its full context in one pass, as in generation.

A document longer than `context` is scored with a sliding window (the "strided perplexity" of
the transformers docs): the first window scores tokens 1..context-1; each next window ends
`stride` tokens later, is prefilled from scratch (a fresh cache: positions restart at 0, no
BOS) over its `context` tokens, and scores only its last `stride` tokens. Every token after the
first window is thus predicted from at least `context - stride` tokens before it.

Per document: nats (negative log-likelihood sum), scored tokens and UTF-8 bytes. Totals:
nats/token, perplexity = exp(nats/token), bits/byte = nats / ln 2 / bytes. The bytes are the
whole text's, so bits-per-byte compares models with different tokenizers. Also per document,
the loss by position (how many tokens of context the prediction had) in power-of-two
buckets: the curve should fall with context if long-range attention helps. (The buckets mix
documents: the long-context ones hold only the long documents' tokens. For a clean comparison,
score the same documents at two --context values.)

Endpoints: each document (split at line ends into pieces of at most `context` tokens, sized by
`count_tokens`) is echoed with log-probabilities; the first token of each piece is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from dsv4.evaluate.backends import EvalError


@dataclass(frozen=True)
class TextDocument:
    key: str
    text: str
    source: str


def load_documents(paths: list[str] | None, val_fraction: float = 0.01) -> list[TextDocument]:
    """Documents of `paths` (text, .jsonl/.json with "text", .parquet "text" column), or the
    validation split of the default corpus (the same documents `dsv4 train` holds out)."""
    from dsv4.pretrain.data import DataError, iter_documents

    try:
        if paths:
            docs = list(iter_documents(paths))
        else:
            from dsv4.pretrain.data import validation_documents

            every = list(iter_documents(None))
            docs = [every[i] for i in validation_documents(len(every), val_fraction)]
    except DataError as err:
        raise EvalError(str(err)) from None
    if not docs:
        raise EvalError(f"no documents in {paths}")
    return [TextDocument(f"{i}:{d.source}", d.text, d.source) for i, d in enumerate(docs)]


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored target) of each window over n tokens: targets t in
    [first, end) are scored from tokens start..t-1."""
    if not 0 < stride <= context - 1:
        raise EvalError(f"--stride {stride}: must be between 1 and --context - 1 = {context - 1}")
    end = min(context, n)
    yield 0, end, 1
    while end < n:
        new_end = min(end + stride, n)
        yield new_end - context, new_end, end
        end = new_end


def token_logprobs(model, ids: list[int], context: int, stride: int, chunk: int = 512,
                   cache=None, on_tokens=None) -> list[tuple[int, float]]:
    """log P(ids[t] | window before t) for t = 1..len(ids)-1, as (tokens of context, logprob)
    pairs in order; see the module docstring."""
    import torch

    from dsv4.inference.cache import KVCache
    from dsv4.inference.engine import forward_step

    device = next(model.parameters()).device
    if cache is None:
        cache = KVCache(model, 1, min(context, len(ids)))
    slot = torch.tensor([0], device=device)
    out: list[tuple[int, float]] = []
    for start, end, first in windows(len(ids), context, stride):
        cache.reset(0)
        window = torch.tensor([ids[start:end]], device=device)
        for c0 in range(0, end - start, chunk):
            piece = window[:, c0: c0 + chunk]
            logits, _ = forward_step(model, cache, slot, piece, all_logits=True)
            # logits at window position p predict token start + p + 1
            lo = max(c0, first - start - 1)
            hi = min(c0 + piece.shape[1], end - start - 1)
            if hi > lo:
                rows = logits[0, lo - c0: hi - c0].float().log_softmax(-1)
                targets = window[0, lo + 1: hi + 1]
                picked = rows.gather(1, targets.unsqueeze(1)).squeeze(1).double().tolist()
                out += [(p + 1, lp) for p, lp in zip(range(lo, hi), picked)]
            if on_tokens is not None:
                on_tokens(piece.shape[1])
    return out


def position_bucket(context_tokens: int) -> int:
    """Bucket b holds predictions made with 2^b .. 2^(b+1)-1 tokens of context."""
    return max(0, context_tokens.bit_length() - 1)


def score_document_local(backend, doc: TextDocument, context: int, stride: int,
                         on_tokens=None) -> dict:
    ids = backend.prompt_ids(doc.text)
    pairs = token_logprobs(backend.model, ids, context, stride, backend.prefill_chunk,
                           cache=backend.scratch_cache(min(context, len(ids))), on_tokens=on_tokens)
    buckets: dict[str, list[float]] = {}
    for seen, lp in pairs:
        b = buckets.setdefault(str(position_bucket(seen)), [0.0, 0])
        b[0] -= lp
        b[1] += 1
    return {"key": doc.key, "source": doc.source, "nats": -sum(lp for _, lp in pairs),
            "tokens": len(pairs), "bytes": len(doc.text.encode()),
            "loss_by_context": buckets}


def split_lines(text: str, max_tokens: int, count_tokens) -> list[str]:
    """Pieces of whole lines with at most ~max_tokens tokens each (a longer line is its own
    piece)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = count_tokens(line)
        if current and size + n > max_tokens:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


def score_document_endpoint(backend, doc: TextDocument, context: int) -> dict:
    pieces = split_lines(doc.text, context, backend.count_tokens)
    scored = [backend.text_logprob(piece) for piece in pieces]  # documents run in parallel
    return {"key": doc.key, "source": doc.source, "nats": -sum(s for s, _ in scored),
            "tokens": sum(n for _, n in scored), "bytes": len(doc.text.encode()),
            "pieces": len(pieces), "loss_by_context": {}}


def summarize(records: list[dict]) -> dict:
    nats = sum(r["nats"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    n_bytes = sum(r["bytes"] for r in records)
    buckets: dict[int, list[float]] = {}
    for r in records:
        for b, (s, c) in r["loss_by_context"].items():
            acc = buckets.setdefault(int(b), [0.0, 0])
            acc[0] += s
            acc[1] += c
    per_token = nats / max(tokens, 1)
    return {
        "documents": len(records),
        "tokens": tokens,
        "bytes": n_bytes,
        "nats_per_token": per_token,
        "perplexity": math.exp(per_token),
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
        "loss_by_context": [{"from_tokens": 2**b, "to_tokens": 2 ** (b + 1) - 1,
                             "nats_per_token": s / c, "count": c}
                            for b, (s, c) in sorted(buckets.items())],
    }
