"""The hybrid KV cache: chunked prefill + decode equal the full forward, transformers' cached
decoding, truncation, FP8 storage and byte accounting."""

from __future__ import annotations

import pytest
import torch

from dsv4.inference.cache import CacheError, KVCache
from dsv4.inference.engine import forward_step
from dsv4.model import costs
from dsv4.model.network import Transformer
from tests.parity_utils import hf_model_from, randomize, tiny_config

ATOL = RTOL = 1e-4
CONFIGS = {
    "mixed": tiny_config(),  # sliding, CSA, HCA, CSA (+ MTP's sliding layer)
    "pro-like": tiny_config(n_layers=3, compress_ratios=[128, 4, 128, 0], index_topk=4),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> Transformer:
    return randomize(Transformer(CONFIGS[request.param]), seed=3).eval()


def full_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def random_ids(model: Transformer, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (1, length), generator=gen)


def cached_logits(model, cache, slot: int, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits at every position of ids [T] fed to one slot in chunks."""
    slots = torch.tensor([slot])
    parts = [forward_step(model, cache, slots, ids[None, s : s + chunk], all_logits=True)[0]
             for s in range(0, len(ids), chunk)]
    return torch.cat(parts, dim=1)[0]


# Prompt lengths cover every residue mod 4 and the residues 0, 1, 2, 126, 127 mod 128; decode
# then crosses further CSA (4) and HCA (128) window boundaries.
PREFILL_LENGTHS = [1, 2, 3, 4, 5, 126, 127, 128, 129, 130, 254, 255, 256, 257]
DECODE_STEPS = 7


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow), 64, 128, 300])
def test_chunked_prefill_then_batched_decode_equals_full_forward(model, chunk) -> None:
    # Tiny chunks mean many steps: fewer lengths, still every residue mod 4 and 128 +- 1.
    lengths = {1: [1, 3, 6, 130], 3: [1, 2, 3, 4, 5, 127, 128, 129, 130]}.get(
        chunk, PREFILL_LENGTHS)
    gen = torch.Generator().manual_seed(chunk)
    total = max(lengths) + DECODE_STEPS
    ids = torch.randint(0, model.cfg.vocab_size, (len(lengths), total), generator=gen)
    reference = full_logits(model, ids)
    cache = KVCache(model, slots=len(lengths) + 1, capacity=512)
    slots = torch.arange(1, len(lengths) + 1)  # slot 0 stays empty
    for i, n in enumerate(lengths):
        got = cached_logits(model, cache, int(slots[i]), ids[i, :n], chunk)
        torch.testing.assert_close(got, reference[i, :n], atol=ATOL, rtol=RTOL)
    # Batched decode: every sequence at its own position.
    positions = torch.tensor(lengths)
    for _ in range(DECODE_STEPS):
        step_ids = ids[torch.arange(len(lengths)), positions].unsqueeze(1)
        logits, _ = forward_step(model, cache, slots, step_ids)
        torch.testing.assert_close(logits[:, 0], reference[torch.arange(len(lengths)), positions],
                                   atol=ATOL, rtol=RTOL)
        positions += 1
    assert cache.lengths.tolist() == [0] + positions.tolist()


def test_long_sequence_every_position() -> None:
    """One 700-token sequence (5 HCA windows, 175 CSA entries >> top-k) in uneven chunks:
    every position's logits match, so every residue mod 4 and mod 128 is covered."""
    model = randomize(Transformer(CONFIGS["mixed"]), seed=4).eval()
    ids = random_ids(model, 700, seed=0)
    reference = full_logits(model, ids)[0]
    cache = KVCache(model, slots=1, capacity=1024)
    got, start = [], 0
    for chunk in [5, 200, 1, 3, 130, 61, 300]:
        got.append(cached_logits(model, cache, 0, ids[0, start : start + chunk], chunk))
        start += chunk
    torch.testing.assert_close(torch.cat(got), reference[:start], atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_teacher_forced_decode_equals_transformers_cached_decoding() -> None:
    from transformers import DynamicCache

    model = randomize(Transformer(CONFIGS["mixed"]), seed=5).eval()
    hf = hf_model_from(model)
    ids = random_ids(model, 270, seed=1)
    hf_cache = DynamicCache(config=hf.config)
    cache = KVCache(model, slots=1, capacity=512)
    slots = torch.tensor([0])
    with torch.no_grad():
        prompt = 200
        theirs = hf(input_ids=ids[:, :prompt], cache=hf_cache, use_cache=True).logits
        ours, _ = forward_step(model, cache, slots, ids[:, :prompt], all_logits=True)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
        for t in range(prompt, ids.shape[1]):
            theirs = hf(input_ids=ids[:, t : t + 1], cache=hf_cache, use_cache=True).logits
            ours, _ = forward_step(model, cache, slots, ids[:, t : t + 1])
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=f"position {t}")


@pytest.mark.parametrize("keep", [250, 255, 256, 257, 259])
def test_truncate_then_continue_equals_full_forward(keep) -> None:
    """Roll back across CSA and HCA window boundaries (an HCA window completes at 256), then
    continue with different tokens: the compressor state comes back exactly."""
    model = randomize(Transformer(CONFIGS["mixed"]), seed=6).eval()
    gen = torch.Generator().manual_seed(keep)
    first = torch.randint(0, model.cfg.vocab_size, (262,), generator=gen)
    second = torch.randint(0, model.cfg.vocab_size, (20,), generator=gen)
    cache = KVCache(model, slots=1, capacity=512, slack=16)
    cached_logits(model, cache, 0, first, 100)
    cache.truncate(0, keep)
    got = cached_logits(model, cache, 0, second, 7)
    reference = full_logits(model, torch.cat((first[:keep], second))[None])[0, keep:]
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=RTOL)


def test_truncating_further_than_the_slack_is_refused() -> None:
    model = randomize(Transformer(CONFIGS["mixed"])).eval()
    cache = KVCache(model, slots=2, capacity=512, slack=8)
    cached_logits(model, cache, 1, torch.arange(100) % 50, 100)
    with pytest.raises(CacheError, match="slot 1: truncating to 91"):
        cache.truncate(1, 91)
    with pytest.raises(CacheError, match="cannot truncate to 101"):
        cache.truncate(1, 101)
    cache.truncate(1, 92)
    cache.truncate(1, 0)  # back to empty always works
    assert cache.lengths.tolist() == [0, 0]


def test_capacity_is_enforced() -> None:
    model = randomize(Transformer(CONFIGS["mixed"])).eval()
    cache = KVCache(model, slots=1, capacity=16)
    cached_logits(model, cache, 0, torch.arange(10), 10)
    with pytest.raises(CacheError, match="exceed the cache capacity of 16"):
        cached_logits(model, cache, 0, torch.arange(7), 7)
    with pytest.raises(CacheError, match="capacity=999999"):
        KVCache(model, slots=1, capacity=999_999)


def test_fp8_storage_is_lossless_for_quant_sim_models() -> None:
    cfg = tiny_config(head_dim=128, rope_head_dim=64, q_lora_rank=128, o_lora_rank=128,
                      dim=128, index_head_dim=64, moe_inter_dim=128, quant_sim=True)
    model = randomize(Transformer(cfg), seed=7).eval()
    ids = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(2))
    plain = cached_logits(model, KVCache(model, slots=1, capacity=512), 0, ids, 64)
    fp8_cache = KVCache(model, slots=1, capacity=512, kv_fp8=True)
    assert torch.equal(cached_logits(model, fp8_cache, 0, ids, 64), plain)
    assert fp8_cache.layers[1].window.store.codes.dtype == torch.float8_e4m3fn


def test_used_bytes_follow_the_analytic_formula() -> None:
    cfg = CONFIGS["mixed"]
    model = randomize(Transformer(cfg)).to(torch.bfloat16).eval()
    cache = KVCache(model, slots=2, capacity=1024)
    cached_logits(model, cache, 1, torch.arange(600) % 100, 256)
    formula = costs.kv_cache_bytes(cfg, 600, "bf16")["total_bytes"]
    assert cache.used_bytes(1) == formula
    by_kind = cache.bytes_by_kind()
    assert by_kind["csa_entries"] == 2 * 2 * (1024 // 4) * cfg.head_dim * 2  # 2 CSA layers
    assert by_kind["csa_indexer_keys"] == 2 * 2 * (1024 // 4) * cfg.index_head_dim * 2
    assert by_kind["hca_entries"] == 2 * (1024 // 128) * cfg.head_dim * 2
    assert by_kind["total"] == sum(v for k, v in by_kind.items() if k != "total")


def test_copied_slot_continues_like_the_original() -> None:
    model = randomize(Transformer(CONFIGS["mixed"]), seed=8).eval()
    ids = random_ids(model, 140, seed=3)
    cache = KVCache(model, slots=3, capacity=256, kv_fp8=False)
    cached_logits(model, cache, 0, ids[0, :133], 64)
    cache.copy_slot(0, 2)
    a, _ = forward_step(model, cache, torch.tensor([0, 2]), ids[:, 133:140].expand(2, -1),
                        all_logits=True)
    torch.testing.assert_close(a[1], a[0], atol=1e-5, rtol=1e-5)  # batch rows: fp32 noise
    torch.testing.assert_close(a[0], full_logits(model, ids)[0, 133:], atol=ATOL, rtol=RTOL)


def test_top_k_ties_go_to_the_lower_index() -> None:
    from dsv4.model.network import top_k_mask

    scores = torch.tensor([[0.5, 0.0, 0.9, 0.0, 0.0, -1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [float("-inf")] * 4 + [2.0, 1.0]])
    assert top_k_mask(scores, 3).tolist() == [
        [True, True, True, False, False, False],
        [True, True, True, False, False, False],
        [True, False, False, False, True, True],  # short of visible entries: padding first
    ]
