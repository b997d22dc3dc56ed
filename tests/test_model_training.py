"""Training-side features of the network: document masking, indexer training, plain residual."""

from __future__ import annotations

import pytest
import torch

from dsv4 import Transformer
from dsv4.model.network import document_positions, indexer_kl_loss, sparse_attention
from tests.parity_utils import randomize, tiny_config

ALIGN = 128  # the packer's document alignment (dsv4/pretrain/data.py)


@pytest.fixture(scope="module")
def model() -> Transformer:
    # (seed: index scores without exact ties at the top-k boundary, where the choice among
    # equal scores is up to topk's implementation and differs with the tensor's length)
    return randomize(Transformer(tiny_config()), seed=6).eval()


def pack(docs: list[torch.Tensor], length: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """One packed row as the loader builds it: each document starts at a multiple of ALIGN,
    preceded by pad tokens with their own doc id. Returns (ids [S], doc_ids [S], starts)."""
    ids = torch.full((length,), pad_id)
    doc_ids = torch.empty(length, dtype=torch.long)
    starts, cursor, next_id = [], 0, 0
    for doc in docs:
        start = -(-cursor // ALIGN) * ALIGN
        if start > cursor:  # the padding run is a document of its own
            doc_ids[cursor:start] = next_id
            next_id += 1
        ids[start : start + len(doc)] = doc
        doc_ids[start : start + len(doc)] = next_id
        next_id += 1
        starts.append(start)
        cursor = start + len(doc)
    doc_ids[cursor:] = next_id
    return ids, doc_ids, starts


def random_docs(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_packed_row_gives_each_documents_own_logits(model: Transformer, mode: str) -> None:
    """Logits (and MTP logits) of a packed batch equal every document's solo forward: no
    attention, compressed entry, CSA overlap row, indexer score or MTP step crosses a boundary.
    Lengths cover a partial last window (mod 4 and mod 128) and documents past 2 x 128."""
    vocab = model.cfg.vocab_size
    rows = [random_docs([203, 90, 300], vocab, seed=0), random_docs([5, 389, 131], vocab, seed=1)]
    packed = [pack(docs, 800, pad_id=2) for docs in rows]
    ids = torch.stack([p[0] for p in packed])
    doc_ids = torch.stack([p[1] for p in packed])
    mtp_ids = torch.roll(ids, -1, dims=1)
    model.set_indexer_mode(mode)
    try:
        with torch.no_grad():
            logits, mtp_logits = model(ids, mtp_input_ids=mtp_ids, doc_ids=doc_ids)
            for row, (docs, (_, _, starts)) in enumerate(zip(rows, packed)):
                for doc, start in zip(docs, starts):
                    n = len(doc)
                    solo_mtp = mtp_ids[row : row + 1, start : start + n]
                    alone, alone_mtp = model(doc.unsqueeze(0), mtp_input_ids=solo_mtp)
                    got = logits[row, start : start + n]
                    torch.testing.assert_close(got, alone[0], atol=2e-5, rtol=2e-5)
                    got_mtp = mtp_logits[row, start : start + n]
                    torch.testing.assert_close(got_mtp, alone_mtp[0], atol=2e-5, rtol=2e-5)
    finally:
        model.set_indexer_mode("sparse")


def test_one_document_is_the_plain_forward(model: Transformer) -> None:
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, doc_ids=torch.zeros_like(ids)), model(ids), atol=1e-5, rtol=1e-5
        )


def test_document_positions_restart_at_each_boundary() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert document_positions(doc_ids).tolist() == [
        [0, 1, 2, 0, 1, 0, 1, 2, 3],
        list(range(9)),
    ]


@pytest.mark.parametrize("window", [16, 64])  # blocked; the whole sequence in one block
def test_window_attention_never_crosses_documents(window: int) -> None:
    """The core attention with doc ids equals running each document separately."""
    gen = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 40, 2, 8, generator=gen), torch.randn(1, 40, 8, generator=gen)
    sink = torch.randn(2, generator=gen)
    doc_ids = torch.tensor([[0] * 13 + [1] * 27])
    out = sparse_attention(q, kv, sink, window, doc_ids=doc_ids)
    first = sparse_attention(q[:, :13], kv[:, :13], sink, window)
    second = sparse_attention(q[:, 13:], kv[:, 13:], sink, window)
    torch.testing.assert_close(out, torch.cat((first, second), dim=1), atol=1e-6, rtol=1e-6)


def test_indexer_loss_trains_only_the_indexer() -> None:
    """With the indexer loss on, the KL reaches exactly the indexer's parameters and the LM
    loss reaches everything else (the indexer's inputs are detached)."""
    model = randomize(Transformer(tiny_config()), seed=1).train()
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 260), generator=torch.Generator().manual_seed(3)
    )
    for mode in ("dense", "sparse"):
        model.set_indexer_mode(mode)
        logits, signals = model(ids, signals=True)
        losses = signals.indexer_losses
        assert len(losses) == 2 and all(torch.isfinite(x) and x >= 0 for x in losses)
        model.zero_grad()
        sum(losses).backward(retain_graph=True)
        touched = {
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        indexer = {n for n, _ in model.named_parameters() if ".indexer." in n}
        assert touched == indexer, sorted(touched ^ indexer)[:5]
        model.zero_grad()
        logits.logsumexp(-1).mean().backward()
        touched = {n for n, p in model.named_parameters() if p.grad is not None}
        assert not touched & indexer
    model.set_indexer_mode("sparse")


def test_signals_report_every_layer_and_change_nothing(model: Transformer) -> None:
    """signals=True gives the same logits plus one routing per MoE layer (main layers, then
    MTP) and the CSA layers' indexer losses; replaying the reported routing changes nothing."""
    cfg, (batch, length) = model.cfg, (2, 260)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    mtp_ids = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        plain = model(ids, mtp_input_ids=mtp_ids)
        (logits, mtp_logits), signals = model(ids, mtp_input_ids=mtp_ids, signals=True)
        replay = torch.stack([r.indices for r in signals.routing])
        replayed = model(ids, routing=replay.view(cfg.n_layers, batch, length, -1))
    assert torch.equal(logits, plain[0]) and torch.equal(mtp_logits, plain[1])
    assert torch.equal(replayed, plain[0])
    assert (len(signals.routing), len(signals.mtp_routing)) == (cfg.n_layers, cfg.n_mtp_layers)
    for indices, scores in signals.routing + signals.mtp_routing:
        assert indices.shape == (batch * length, cfg.n_activated_experts)
        assert scores.shape == (batch * length, cfg.n_routed_experts)
    assert len(signals.indexer_losses) == cfg.layer_kinds.count("csa")


def test_dense_mode_attends_every_visible_entry_and_sparse_only_top_k() -> None:
    """Dense CSA differs from sparse only once a query sees more than top-k entries."""
    model = randomize(Transformer(tiny_config(index_topk=4)), seed=2).eval()
    ids = torch.randint(
        0, model.cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        sparse = model(ids)
        model.set_indexer_mode("dense")
        dense = model(ids)
        model.set_indexer_mode("sparse")
    # query t sees (t+1)//4 entries: <= 4 up to t = 18, so the two agree there and not after
    torch.testing.assert_close(sparse[:, :19], dense[:, :19], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(sparse[:, 19:], dense[:, 19:])


def test_indexer_kl_is_zero_when_the_indexer_matches_the_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 3, 2, 5, generator=gen)  # [B, S, H, C]
    attended = torch.ones(1, 3, 5, dtype=torch.bool)
    attended[0, 0, 3:] = False
    target = probs.sum(2).masked_fill(~attended, 0)
    target = target / target.sum(-1, keepdim=True)
    matching = target.clamp_min(1e-30).log()
    assert indexer_kl_loss(matching, attended, probs).abs() < 1e-6
    assert indexer_kl_loss(torch.zeros(1, 3, 5), attended, probs) > 1e-3
    assert indexer_kl_loss(matching, torch.zeros_like(attended), probs) is None


def test_plain_residual_switch_keeps_one_stream_and_trains() -> None:
    cfg = tiny_config(hc_plain_residual=True)
    model = randomize(Transformer(cfg), seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    streams = model.hidden_streams(ids)
    torch.testing.assert_close(streams[..., 1, :], streams[..., 0, :], atol=0, rtol=0)
    logits = model(ids)
    logits.logsumexp(-1).mean().backward()
    assert model.layers[0].hc_attn_fn.grad is None  # mHC generators unused
    assert model.layers[0].attn.wq_a.weight.grad.abs().sum() > 0
    mhc = randomize(Transformer(tiny_config()), seed=0)
    with torch.no_grad():
        assert not torch.allclose(mhc(ids), model(ids))
