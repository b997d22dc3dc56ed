"""Analytic costs of any ModelConfig: parameters, KV-cache bytes, decode FLOPs.

Pure arithmetic on the config (no torch): `dsv4 info` and planning tools use it without
loading the network, and tests check it against the network built on the meta device.

Parameter shapes follow the released checkpoints' tensors (`model.safetensors.index.json`); the
KV-cache accounting follows the V4 report's KV-cache and inference-FLOPs comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsv4.model.config import LAYER_KINDS, ModelConfig

# DeepSeek-V3.2 (MLA + DSA), the baseline the V4 report compares against (KV cache, FLOPs).
V32_LAYERS = 61
V32_KV_LATENT = 512  # MLA compressed KV, FP8 in the production cache
V32_ROPE_DIM = 64  # BF16
V32_INDEX_HEADS = 64
V32_INDEX_HEAD_DIM = 128
V32_INDEX_TOPK = 2048
V32_HEADS = 128
V32_ACTIVE_PARAMS = 37e9

FP32_BYTES = 4


# ---- parameters ---------------------------------------------------------------------------
def attention_core_params(cfg: ModelConfig) -> int:
    """Projections, norms and sink shared by all attention kinds (no compressor/indexer)."""
    d, c, h, g = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.o_groups
    return (
        cfg.q_lora_rank * d  # wq_a
        + cfg.q_lora_rank  # q_norm
        + h * c * cfg.q_lora_rank  # wq_b
        + c * d  # wkv
        + c  # kv_norm
        + g * cfg.o_lora_rank * (h * c // g)  # wo_a: one [o_lora_rank, h*c/g] block per group
        + d * g * cfg.o_lora_rank  # wo_b
        + h  # attn_sink
    )


def compressor_params(cfg: ModelConfig, ratio: int, head_dim: int) -> int:
    """A KV compressor of the given ratio producing `head_dim`-wide entries."""
    # The overlapping CSA compressor (ratio 4) emits two series: previous and own window.
    coff = 2 if ratio == 4 else 1
    width = coff * head_dim
    return 2 * width * cfg.dim + ratio * width + head_dim  # wkv + wgate, ape, norm


def indexer_params(cfg: ModelConfig) -> int:
    """Lightning Indexer of a CSA layer, its own ratio-4 compressor included."""
    return (
        cfg.index_n_heads * cfg.index_head_dim * cfg.q_lora_rank  # wq_b
        + cfg.index_n_heads * cfg.dim  # weights_proj
        + compressor_params(cfg, 4, cfg.index_head_dim)
    )


def attention_params(cfg: ModelConfig, ratio: int) -> int:
    """All attention parameters of one layer with compress ratio 0 (sliding), 4 or 128."""
    n = attention_core_params(cfg)
    if ratio:
        n += compressor_params(cfg, ratio, cfg.head_dim)
    if ratio == 4:
        n += indexer_params(cfg)
    return n


def expert_params(cfg: ModelConfig) -> int:
    """One SwiGLU expert (routed or shared): w1, w3 [inter, dim] and w2 [dim, inter]."""
    return 3 * cfg.moe_inter_dim * cfg.dim


def router_params(cfg: ModelConfig, hash_routed: bool) -> int:
    # Hash layers keep gate.weight (it still weights the hashed experts) but have no bias;
    # their tid2eid table is a buffer, counted by `param_counts` separately.
    return cfg.n_routed_experts * cfg.dim + (0 if hash_routed else cfg.n_routed_experts)


def mhc_block_params(cfg: ModelConfig) -> int:
    """hc_attn_* and hc_ffn_*: fn [(2+hc)*hc, hc*dim], base [(2+hc)*hc], scale [3], twice."""
    hc = cfg.hc_mult
    mix = (2 + hc) * hc  # pre (hc) + post (hc) + comb (hc*hc) mixing weights
    return 2 * (mix * hc * cfg.dim + mix + 3)


def block_params(cfg: ModelConfig, ratio: int, hash_routed: bool) -> int:
    """One transformer block: norms, mHC, attention, full MoE."""
    return (
        2 * cfg.dim  # attn_norm, ffn_norm
        + mhc_block_params(cfg)
        + attention_params(cfg, ratio)
        + router_params(cfg, hash_routed)
        + (cfg.n_routed_experts + cfg.n_shared_experts) * expert_params(cfg)
    )


def block_active_params(cfg: ModelConfig, ratio: int, hash_routed: bool) -> int:
    """Parameters one token touches in a block: only n_activated routed experts."""
    inactive = cfg.n_routed_experts - cfg.n_activated_experts
    return block_params(cfg, ratio, hash_routed) - inactive * expert_params(cfg)


def hc_head_params(cfg: ModelConfig) -> int:
    hc = cfg.hc_mult
    return hc * hc * cfg.dim + hc + 1  # hc_head_fn, hc_head_base, hc_head_scale


def mtp_params(cfg: ModelConfig) -> int:
    """All MTP blocks; they share the embedding and the head with the main model."""
    per_block = (
        2 * cfg.dim * cfg.dim  # e_proj, h_proj
        + 3 * cfg.dim  # enorm, hnorm, norm
        + hc_head_params(cfg)
        + block_params(cfg, cfg.mtp_compress_ratio, hash_routed=False)  # learned routing
    )
    return cfg.n_mtp_layers * per_block


def param_counts(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts of the network; MTP is excluded from `total` and `active`, as in the
    paper's 284B/13B and 1.6T/49B.

    `active` excludes the input embedding (a lookup, not a matmul) and counts per layer the
    router, shared experts, n_activated routed experts, attention, norms and mHC, plus the
    final norm, HC head and output head. `buffers` is the int64 tid2eid tables of the hash
    layers, which are checkpoint tensors but not trainable parameters.
    """
    ratios = cfg.compress_ratios[: cfg.n_layers]
    hashed = [i < cfg.n_hash_layers for i in range(cfg.n_layers)]
    embedding = cfg.vocab_size * cfg.dim
    head = cfg.vocab_size * cfg.dim + cfg.dim + hc_head_params(cfg)  # head, norm, hc_head
    layers = sum(block_params(cfg, r, h) for r, h in zip(ratios, hashed))
    layers_active = sum(block_active_params(cfg, r, h) for r, h in zip(ratios, hashed))
    total = embedding + layers + head
    mtp = mtp_params(cfg)
    return {
        "total": total,
        "total_with_mtp": total + mtp,
        "active": layers_active + head,
        "mtp": mtp,
        "embedding": embedding,
        "head": head,
        "layers": layers,
        "attention_core_per_layer": attention_core_params(cfg),
        "attention_per_layer": {LAYER_KINDS[r]: attention_params(cfg, r) for r in LAYER_KINDS},
        "routed_expert": expert_params(cfg),
        "buffers": cfg.n_hash_layers * cfg.vocab_size * cfg.n_activated_experts,
    }


# ---- KV cache ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KVLayout:
    """Bytes of one cache entry: a main KV entry (window or compressed) and an indexer key."""

    name: str
    main_entry: int
    indexer_entry: int


def fp8_layout(cfg: ModelConfig) -> KVLayout:
    """The production layout (V4 report, KV cache): FP8 nope dims + BF16 rope dims + one UE8M0 scale
    byte per 64 nope dims, padded to an even size (512/64 -> 448 + 128 + 7 + 1 = 584 B);
    indexer keys FP4 E2M1 with one E8M0 scale per 32 values (128 -> 64 + 4 = 68 B)."""
    nope = cfg.head_dim - cfg.rope_head_dim
    main = nope + 2 * cfg.rope_head_dim + math.ceil(nope / 64)
    main += main % 2
    indexer = math.ceil(cfg.index_head_dim / 2) + math.ceil(cfg.index_head_dim / 32)
    return KVLayout("fp8", main, indexer)


def bf16_layout(cfg: ModelConfig) -> KVLayout:
    """Everything in BF16 (vLLM's accounting, a cross-check)."""
    return KVLayout("bf16", 2 * cfg.head_dim, 2 * cfg.index_head_dim)


LAYOUTS = {"fp8": fp8_layout, "bf16": bf16_layout}


def v32_bytes_per_token(layout: str = "fp8") -> int:
    """DeepSeek-V3.2 cache bytes per token, all 61 layers: every token is stored (MLA + DSA).

    fp8: 656 B (512 FP8 + 4 fp32 scales + 64 BF16) + 132 B FP8 indexer key = 788 B/layer;
    bf16: 2 * (512 + 64) + 2 * 128 = 1408 B/layer.
    """
    if layout == "fp8":
        per_layer = (V32_KV_LATENT + 4 * FP32_BYTES + 2 * V32_ROPE_DIM
                     + V32_INDEX_HEAD_DIM + FP32_BYTES)
    elif layout == "bf16":
        per_layer = 2 * (V32_KV_LATENT + V32_ROPE_DIM) + 2 * V32_INDEX_HEAD_DIM
    else:
        raise ValueError(f"layout={layout!r}: must be one of {sorted(LAYOUTS)}")
    return V32_LAYERS * per_layer


def layer_counts(cfg: ModelConfig) -> dict[str, int]:
    """Main layers per attention kind, and hash-routed MoE layers."""
    kinds = cfg.layer_kinds
    counts = {kind: kinds.count(kind) for kind in LAYER_KINDS.values()}
    counts["hash_moe"] = cfg.n_hash_layers
    counts["mtp"] = cfg.n_mtp_layers
    return counts


def compressor_state_bytes(cfg: ModelConfig) -> int:
    """Per-request fp32 compressor tails (the official `Compressor`'s state): kv and gate rows
    not yet compressed.

    CSA main [2*4, 2*head_dim], CSA indexer [2*4, 2*index_head_dim], HCA [128, head_dim],
    each twice (kv_state and score_state), as the reference keeps them.
    """
    counts = layer_counts(cfg)
    csa = 2 * (2 * 4) * (2 * cfg.head_dim) * FP32_BYTES
    csa_indexer = 2 * (2 * 4) * (2 * cfg.index_head_dim) * FP32_BYTES
    hca = 2 * 128 * cfg.head_dim * FP32_BYTES
    return counts["csa"] * (csa + csa_indexer) + counts["hca"] * hca


def kv_cache_bytes(cfg: ModelConfig, context: int, layout: str = "fp8") -> dict[str, Any]:
    """Cache bytes of one sequence of `context` tokens, main layers only (the
    MTP block is left out, as in the paper's figures).

    total = L * n_win * B_kv (window ring, allocated whole) + N_CSA * floor(T/4) * (B_kv +
    B_idx) + N_HCA * floor(T/128) * B_kv. The fp32 compressor tails are reported apart
    (`compressor_state_bytes`), not in `total_bytes`.
    """
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ValueError(f"context={context!r}: must be a positive integer")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {sorted(LAYOUTS)}")
    entry = LAYOUTS[layout](cfg)
    counts = layer_counts(cfg)
    window = cfg.n_layers * cfg.window_size * entry.main_entry
    csa_main = counts["csa"] * (context // 4) * entry.main_entry
    csa_indexer = counts["csa"] * (context // 4) * entry.indexer_entry
    hca = counts["hca"] * (context // 128) * entry.main_entry
    total = window + csa_main + csa_indexer + hca
    per_token = total / context
    v32 = v32_bytes_per_token(layout)
    return {
        "layout": layout,
        "context": context,
        "main_entry_bytes": entry.main_entry,
        "indexer_entry_bytes": entry.indexer_entry,
        "window_bytes": window,
        "csa_main_bytes": csa_main,
        "csa_indexer_bytes": csa_indexer,
        "hca_bytes": hca,
        "total_bytes": total,
        "compressor_state_bytes": compressor_state_bytes(cfg),
        "bytes_per_token": per_token,
        # The growing part only: what each further token adds in the long run.
        "asymptotic_bytes_per_token": (counts["csa"] * (entry.main_entry + entry.indexer_entry)
                                       / 4 + counts["hca"] * entry.main_entry / 128),
        "v32_bytes_per_token": v32,
        "v32_total_bytes": v32 * context,
        "ratio_vs_v32": per_token / v32,
    }


# ---- FLOPs -------------------------------------------------------------------------------
def decode_flops_per_token(cfg: ModelConfig, context: int) -> dict[str, float]:
    """Rough FLOPs to decode one token at position `context` (as the V4 report counts): 2 per active
    parameter, plus attention 2 * n_heads * keys * 2 * head_dim per layer (scores and values),
    plus the indexer scan 2 * index_heads * index_dim * floor(T/4) per CSA layer; and the same
    for DeepSeek-V3.2 (37B active, top-2048 MLA over 576/512-dim latents, indexer over all T).
    """
    counts = layer_counts(cfg)
    window = min(cfg.window_size, context)
    csa_keys = window + min(cfg.index_topk, context // 4)
    hca_keys = window + context // 128
    keys = counts["sliding"] * window + counts["csa"] * csa_keys + counts["hca"] * hca_keys
    linear = 2.0 * param_counts(cfg)["active"]
    attention = 2.0 * cfg.n_heads * keys * 2 * cfg.head_dim
    indexer = 2.0 * cfg.index_n_heads * cfg.index_head_dim * (context // 4) * counts["csa"]
    total = linear + attention + indexer
    v32 = (2 * V32_ACTIVE_PARAMS
           + V32_LAYERS * 2.0 * V32_HEADS * min(V32_INDEX_TOPK, context)
           * (V32_KV_LATENT + V32_ROPE_DIM + V32_KV_LATENT)
           + V32_LAYERS * 2.0 * V32_INDEX_HEADS * V32_INDEX_HEAD_DIM * context)
    return {"linear": linear, "attention": attention, "indexer": indexer, "total": total,
            "v32_total": v32, "ratio_vs_v32": total / v32}
