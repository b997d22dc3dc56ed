"""Our logits equal transformers' DeepseekV4ForCausalLM on the same weights (fp32, eager).

Configs cover all three layer types with the real compression rates (4 and 128), hash-routed
layers, an indexer top-k smaller than the number of visible entries, every residue of the
length mod 4, lengths above 2*128+3 and batch size 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.model.network import Transformer
from dsv4.weights.convert import from_hf_state_dict, to_hf_state_dict
from tests.parity_utils import hf_model_from, randomize, tiny_config

pytest.importorskip("transformers")

CONFIGS = {
    # sliding, CSA, HCA, CSA; two hash layers. 16 index heads: an index score is exactly 0 when
    # every head's ReLU is 0 (2^-heads), and at the top-k boundary such ties are broken by
    # the lower index in dsv4 (`top_k_mask`) but in torch.topk's unspecified order in
    # transformers; with 8 heads one query in ~500 hits such a tie.
    "mixed": tiny_config(index_n_heads=16),
    # V4-Pro's schedule shape: HCA first, then CSA/HCA; three hash layers; wider heads
    "pro-like": tiny_config(
        n_layers=5,
        compress_ratios=[128, 128, 4, 128, 4, 0],
        n_hash_layers=3,
        n_heads=8,
        head_dim=64,
        rope_head_dim=32,
        o_groups=4,
        q_lora_rank=48,
        index_topk=4,
        index_n_heads=16,
        index_head_dim=64,
        route_scale=2.5,
        n_routed_experts=6,
        n_activated_experts=3,
    ),
    # V4-Flash's schedule shape: two sliding-only layers first
    "flash-like": tiny_config(
        n_layers=5,
        compress_ratios=[0, 0, 4, 128, 4, 0],
        n_hash_layers=3,
        head_dim=48,
        index_topk=16,
        moe_inter_dim=24,
        vocab_size=200,
    ),
}
LENGTHS = {
    "mixed": [1, 2, 3, 4, 5, 6, 7, 129, 259, 262, 263, 264, 300],
    "pro-like": [3, 130, 261, 262, 263, 264, 391],
    "flash-like": [2, 127, 128, 261, 262, 263, 268],
}
ATOL = RTOL = 1e-4


def assert_same_logits(ours: Transformer, hf, length: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, length), generator=gen)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().mean() > 0.3, "logits too close to zero to be a meaningful check"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_our_weights_in_transformers_give_our_logits(name: str) -> None:
    cfg = CONFIGS[name]
    ours = randomize(Transformer(cfg), seed=1).eval()
    hf = hf_model_from(ours)
    longest = max(LENGTHS[name])
    if 4 in cfg.compress_ratios[: cfg.n_layers]:  # the indexer's choice must matter
        assert longest // 4 > cfg.index_topk
    for length in LENGTHS[name]:
        assert_same_logits(ours, hf, length, seed=length)


def randomize_hf(hf, seed: int) -> None:
    """Random weights set on the transformers model by its own names (independent of our
    converter), with a random hash table and balancing bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            else:  # sinks, mHC base/scale, position biases
                p.copy_(torch.randn(p.shape, generator=gen))
        for name, buf in hf.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(
                    torch.rand(buf.shape[0], hf.config.n_routed_experts, generator=gen).argsort(-1)[
                        :, : buf.shape[1]
                    ]
                )
            elif name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen))


@pytest.mark.parametrize("name", ["mixed", "pro-like"])
def test_transformers_weights_in_dsv4_give_transformers_logits(name: str) -> None:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = CONFIGS[name]
    hf_cfg = DeepseekV4Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(hf_cfg).eval()
    randomize_hf(hf, seed=2)
    ours = Transformer(cfg).eval()
    missing, unexpected = ours.load_state_dict(
        from_hf_state_dict(hf.state_dict(), cfg), strict=False
    )
    assert not unexpected
    assert all(k.startswith("mtp.") for k in missing), missing  # transformers has no MTP
    for length in (5, 263):
        assert_same_logits(ours, hf, length, seed=length)


def test_round_trip_of_names_preserves_every_tensor() -> None:
    cfg = CONFIGS["mixed"]
    state = randomize(Transformer(cfg)).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state, cfg), cfg)
    assert set(back) == {k for k in state if not k.startswith("mtp.")}
    for key, tensor in back.items():
        assert torch.equal(tensor, state[key]), key


def test_unknown_names_are_rejected() -> None:
    cfg = CONFIGS["mixed"]
    with pytest.raises(KeyError, match="layers.0.attn.bogus"):
        to_hf_state_dict({"layers.0.attn.bogus.weight": torch.zeros(1)}, cfg)
    with pytest.raises(KeyError, match="n_layers"):
        from_hf_state_dict({"model.layers.9.self_attn.sinks": torch.zeros(4)}, cfg)
