"""The DeepSeek-V4 network, top to bottom, in the order data flows.

norms -> RoPE/YaRN -> mHC -> compressor -> indexer -> attention -> MoE -> block -> MTP -> model.

Parameter names follow the official checkpoint (`embed`, `layers.L.attn.wq_a`, `layers.L.ffn.gate`,
`mtp.0.e_proj`, ...), except that routed experts are stacked per layer (`ffn.experts.w1` is
`[E, inter, dim]`), so an expert matmul is one indexed weight and Muon can treat each expert
matrix on its own. Shapes in comments: B batch, S sequence, H heads, D head dim, C compressed
entries, N mHC streams.

One forward serves training, prefill and decode: every module takes an optional cache
(`dsv4.inference.cache.KVCache`, or its per-layer `LayerCache`). Without one, a forward sees whole
sequences from position 0; with one, it feeds new tokens of cache slots, and the attention layer
hands its projected queries and keys to the cache, which holds the window and compressed entries
and runs the cached attention core.

Training additions (all optional, off by default):
- Document masking: `forward(..., doc_ids=[B, S])` treats each run of equal ids as its own
  document: RoPE positions restart at every document, the window attention, the compressed
  entries (CSA overlap rows included), the indexer and the MTP block never look across a
  boundary. A compression window holding tokens of two documents produces no entry. With every
  document starting at a multiple of 128 (the packer's alignment), a packed row gives exactly
  the logits of each document run alone (tests/test_model_training.py).
- Lightning Indexer training (`Transformer.set_indexer_mode`), see `Attention.compressed`.
- Training signals: `forward(..., signals=True)` also returns a `Signals` (each MoE layer's
  routing, each CSA layer's indexer loss), and `forward(..., routing=...)` replays recorded
  experts. Both are arguments and return values: no module keeps state between forwards.
- `ModelConfig.hc_plain_residual`: a plain residual stream in place of mHC (an ablation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.config import ModelConfig
from dsv4.model.numerics import fp4_e2m1_roundtrip, fp8_e4m3_roundtrip, hadamard_transform

# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in fp32 (the official `RMSNorm`), result in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = as_float(x)
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)  # a bf16 weight promotes to fp32 exactly


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS normalization over the last dim (per-head queries), in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class Linear(nn.Linear):
    """A bias-free linear layer whose weights ship in FP8 in the official checkpoints.

    With `quant_sim` its input is FP8-quantized per 1x128 block first, as the reference's
    FP8 GEMM does (the official `act_quant`); otherwise it is a plain `nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int, quant_sim: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.quant_sim = quant_sim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(act_quant(x) if self.quant_sim else x)


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """FP8 round trip of activations in 1x128 blocks along the input dim (official `act_quant`)."""
    return fp8_e4m3_roundtrip(x, block=128)


# ---------------------------------------------------------------------------------------------
# RoPE with per-layer tables (YaRN scaling on the compressed layers, as the official config)
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig, compressed_layer: bool) -> torch.Tensor:
    """Inverse frequencies of the interleaved partial RoPE, [rope_head_dim // 2] fp32.

    Sliding-only layers: base `rope_theta`, no YaRN. CSA/HCA layers: base `compress_rope_theta`
    with YaRN frequency interpolation (no mscale: cos/sin keep magnitude 1).
    """
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed_layer else cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not compressed_layer or not cfg.original_seq_len:  # original_seq_len 0: YaRN off
        return inv_freq.float()

    def correction_dim(rotations: float) -> float:
        return (
            dim * math.log(cfg.original_seq_len / (2 * math.pi * rotations)) / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / cfg.rope_factor) * ramp
    return inv_freq.float()


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle position * theta_i: [..., rope_dim // 2] fp32 for positions [...]."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the *last* 2*len(cos) dims of x.

    x: [B, S, ..., D]; cos/sin: [B or 1, S, rope_dim // 2] (broadcast over the head axes).
    Pass -sin for the inverse rotation applied to the attention output.
    """
    rope_dim = 2 * cos.shape[-1]
    while cos.dim() < x.dim():  # insert head axes between S and the feature axis
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    pairs = rope.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)


# ---------------------------------------------------------------------------------------------
# mHC: manifold-constrained hyper-connections (V4 report: mHC; the official `hc_pre`/`hc_post`)
# ---------------------------------------------------------------------------------------------


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., N, N] logits to a (near) doubly-stochastic matrix, in the kernel's order:
    row softmax + eps, column normalization, then (iters - 1) x (row, column).

    eps is a tensor (a Python float costs four conversion calls per use) and, without autograd,
    the normalizations run in place: this loop is a third of a decode step's operator calls.
    (`linalg.vector_norm` would be one call instead of sum's two, but is 20x slower on the
    [tokens, N, N] batches of a prefill.)"""
    eps_t = logits.new_tensor(eps)
    m = logits.softmax(dim=-1) + eps_t

    def total(dim: int) -> torch.Tensor:
        return m.sum(dim=dim, keepdim=True)

    if torch.is_grad_enabled():
        m = m / (total(-2) + eps_t)
        for _ in range(iters - 1):
            m = m / (total(-1) + eps_t)
            m = m / (total(-2) + eps_t)
        return m
    m /= total(-2).add_(eps_t)
    for _ in range(iters - 1):
        m /= total(-1).add_(eps_t)
        m /= total(-2).add_(eps_t)
    return m


def hc_mix(x32: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """fn . RMS-normalized vec(X), fp32. x32: [B, S, N, d] fp32 -> [B, S, fn.shape[0]]."""
    flat = x32.flatten(-2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn.float())


def static_shapes() -> bool:
    """True while `torch.compile` traces: the cached forward then sizes its tensors from the
    cache's capacity instead of reading lengths (a host sync and a data-dependent shape)."""
    return torch.compiler.is_compiling()


def as_float(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, without an operator call when it already is."""
    return x if x.dtype == torch.float32 else x.float()


class HyperConnection(nn.Module):
    """One mHC site (before attention or before the MoE): pre / post / comb from the streams.

    Parameters are registered on the owning block under the official names (`hc_attn_fn`, ...),
    so this is a plain function object holding the config constants.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n = cfg.hc_mult
        self.iters = cfg.hc_sinkhorn_iters
        self.hc_eps = cfg.hc_eps
        self.norm_eps = cfg.norm_eps
        self.plain = cfg.hc_plain_residual

    def pre(self, x: torch.Tensor, fn, base, scale) -> tuple[torch.Tensor, ...]:
        """x: [B, S, N, d] -> (block input [B, S, d], post [B, S, N], comb [B, S, N, N]).

        With `hc_plain_residual` the N streams are identical copies of one residual stream:
        the block input is that stream, and post/comb are None (`post` then adds y)."""
        if self.plain:
            return x[..., 0, :], None, None
        n = self.n
        x32 = as_float(x)
        mix = hc_mix(x32, fn, self.norm_eps)
        # One scale per group of rows (pre, post, comb), as one multiply-add.
        scales = scale.float().repeat_interleave(scale.new_tensor([n, n, n * n], dtype=torch.long))
        mix = torch.addcmul(base.float(), mix, scales)
        gates = torch.sigmoid(mix[..., : 2 * n])
        pre = gates[..., :n] + self.hc_eps
        post = gates[..., n:] * 2
        comb = sinkhorn(mix[..., 2 * n :].unflatten(-1, (n, n)), self.iters, self.hc_eps)
        collapsed = torch.matmul(pre.unsqueeze(-2), x32).squeeze(-2)  # sum_i pre_i X_i
        return collapsed.to(x.dtype), post, comb

    @staticmethod
    def post(
        y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """New stream j = post_j * y + sum_i comb[i, j] * X_i (comb's first index = source).

        post/comb None (plain residual): every stream becomes X + y."""
        if post is None:
            return x + y.to(x.dtype).unsqueeze(-2)
        mixed = torch.matmul(comb.transpose(-1, -2), as_float(x))
        return torch.addcmul(mixed, post.unsqueeze(-1), as_float(y).unsqueeze(-2)).to(x.dtype)


def hc_head(
    x: torch.Tensor, fn, base, scale, hc_eps: float, norm_eps: float, plain: bool = False
) -> torch.Tensor:
    """Final collapse of the N streams (no post/comb): sum_i (sigmoid(.) + eps)_i X_i.

    plain (hc_plain_residual): the streams are copies of one stream, which is returned. (Without
    the flag a plain model differs only by a positive scale, which the final RMSNorm removes.)"""
    if plain:
        return x[..., 0, :]
    x32 = as_float(x)
    mix = hc_mix(x32, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return torch.matmul(pre.unsqueeze(-2), x32).squeeze(-2).to(x.dtype)


def hc_params(module: nn.Module, prefix: str, cfg: ModelConfig, rows: int) -> None:
    """Register `{prefix}_fn [rows, N*d]`, `{prefix}_base [rows]`, `{prefix}_scale` (fp32)."""
    n_scales = 3 if rows == (2 + cfg.hc_mult) * cfg.hc_mult else 1
    module.register_parameter(
        f"{prefix}_fn", nn.Parameter(torch.zeros(rows, cfg.hc_mult * cfg.dim))
    )
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.zeros(rows)))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.ones(n_scales)))


# ---------------------------------------------------------------------------------------------
# Compressor (CSA ratio 4 with overlapping windows, HCA ratio 128; the official `Compressor`)
# ---------------------------------------------------------------------------------------------


def compress_windows(
    kv: torch.Tensor,
    gate: torch.Tensor,
    ratio: int,
    overlap: bool,
    prev_kv: torch.Tensor | None = None,
    prev_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool complete windows into one entry each by a per-channel softmax over the window rows.

    kv, gate: [B, n*ratio, width] fp32 with the slot bias `ape` already added to `gate`.
    Overlapping (CSA): width = 2*D; channels [:D] feed the *next* window's entry, [D:] the own
    window's, so entry i pools 2*ratio rows: prev window's [:D] rows, then own [D:] rows.
    prev_kv/prev_gate: [B, ratio, D] previous-window rows for entry 0 (None: zero rows with
    gate -inf, i.e. no previous window). Returns [B, n, D] (before norm and RoPE).
    """
    batch, length, width = kv.shape
    n = length // ratio
    if overlap and n == 0:
        return kv.new_zeros(batch, 0, width // 2)
    kv = kv.view(batch, n, ratio, width)
    gate = gate.view(batch, n, ratio, width)
    if overlap:
        d = width // 2
        if prev_kv is None:
            prev_kv = kv.new_zeros(batch, 1, ratio, d)
            prev_gate = gate.new_full((batch, 1, ratio, d), float("-inf"))
        else:
            prev_kv, prev_gate = prev_kv.unsqueeze(1), prev_gate.unsqueeze(1)
        shifted_kv = torch.cat((prev_kv, kv[:, :-1, :, :d]), dim=1)  # [B, n, ratio, D]
        shifted_gate = torch.cat((prev_gate, gate[:, :-1, :, :d]), dim=1)
        kv = torch.cat((shifted_kv, kv[..., d:]), dim=2)  # [B, n, 2*ratio, D]
        gate = torch.cat((shifted_gate, gate[..., d:]), dim=2)
    return (gate.softmax(dim=2) * kv).sum(dim=2)


class Compressor(nn.Module):
    """Turns a layer's normalized input into compressed KV entries (one per `ratio` tokens)."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int):
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = ratio == 4
        width = 2 * head_dim if self.overlap else head_dim
        self.wkv = nn.Linear(cfg.dim, width, bias=False)
        self.wgate = nn.Linear(cfg.dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(head_dim, cfg.norm_eps)

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token kv and gate rows in fp32; gate gets `ape[slot in window]`. x: [B, S, dim].

        An fp32 GEMM whatever the activation dtype, as the official `Compressor` projects
        (`cast_model` keeps wkv/wgate in fp32, so the casts here cost nothing there)."""
        x32 = as_float(x)
        kv = as_float(F.linear(x32, as_float(self.wkv.weight)))  # as_float: under autocast
        gate = as_float(F.linear(x32, as_float(self.wgate.weight)))
        gate = gate + as_float(self.ape)[positions % self.ratio]
        return kv, gate

    def normed(self, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm of fp32 pooled entries, rounded to the activation dtype first (the official
        `Compressor` casts the pooled entry back to the input dtype before its norm)."""
        return self.norm(pooled.to(dtype))

    def finish(
        self,
        pooled: torch.Tensor,
        first_entry: int,
        inv_freq: torch.Tensor,
        entry_positions: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """RMSNorm, then RoPE at entry position i*ratio. pooled: [B, n, D] -> [B, n, D].

        entry_positions [B or 1, n]: explicit rotation positions (document-relative position of
        each window's first token, in packed training); default (first_entry + i) * ratio.
        dtype: the activations' (see `normed`)."""
        entries = self.normed(pooled, dtype)
        if entry_positions is None:
            positions = torch.arange(pooled.shape[1], device=pooled.device) + first_entry
            entry_positions = (positions * self.ratio).unsqueeze(0)
        cos, sin = rope_cos_sin(inv_freq, entry_positions)
        return apply_rope(entries, cos, sin)

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Entries of every complete window of a sequence starting at position 0: [B, S//r, D]."""
        n = x.shape[1] // self.ratio
        positions = torch.arange(n * self.ratio, device=x.device)
        kv, gate = self.project(x[:, : n * self.ratio], positions)
        pooled = compress_windows(kv, gate, self.ratio, self.overlap)
        return self.finish(pooled, 0, inv_freq, dtype=x.dtype)

    def forward_documents(
        self, x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor,
        doc_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries of a packed row, compressing each document on its own (packed documents never
        see each other).

        x: [B, S, dim]; positions: [B, S] document-relative; doc_ids: [B, S].
        Returns (entries [B, n, D], entry_doc [B, n], entry_ok [B, n] bool). A window holding
        tokens of two documents (a document's tail followed by the next one's padding) gives no
        usable entry (entry_ok False): it is the trailing partial block the paper discards.
        A CSA entry pools the previous window's rows only if that window is the same document.
        """
        batch, n = x.shape[0], x.shape[1] // self.ratio
        length = n * self.ratio
        kv, gate = self.project(x[:, :length], positions[:, :length])
        window_doc = doc_ids[:, :length].view(batch, n, self.ratio)
        entry_doc = window_doc[..., 0]
        entry_ok = entry_doc == window_doc[..., -1]  # documents are contiguous runs
        if self.overlap and n > 1:
            # Rows [:D] of window i-1 feed entry i: cut them where entry i starts a document.
            same_doc = entry_ok[:, 1:] & entry_ok[:, :-1] & (entry_doc[:, 1:] == entry_doc[:, :-1])
            cut = F.pad(~same_doc, (0, 1), value=True)  # [B, n]: window i feeds no next entry
            d = self.head_dim
            gate = gate.view(batch, n, self.ratio, 2 * d)
            low = gate[..., :d].masked_fill(cut.view(batch, n, 1, 1), float("-inf"))
            gate = torch.cat((low, gate[..., d:]), dim=-1).view(batch, length, 2 * d)
        pooled = compress_windows(kv, gate, self.ratio, self.overlap)
        entry_positions = positions[:, :length : self.ratio]
        return self.finish(pooled, 0, inv_freq, entry_positions, x.dtype), entry_doc, entry_ok


# ---------------------------------------------------------------------------------------------
# Lightning Indexer (CSA layers; V4 report: CSA, the official `Indexer`)
# ---------------------------------------------------------------------------------------------


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries query t may use: (t + 1) // ratio (the code's rule)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its document (runs of equal ids): [B, S] -> [B, S]."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def visible_document_entries(
    doc_ids: torch.Tensor, entry_doc: torch.Tensor, entry_ok: torch.Tensor, ratio: int
) -> torch.Tensor:
    """[B, S, C] bool: entry s is complete by query t (s < (t+1)//ratio) and of t's document."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    complete = torch.arange(entry_doc.shape[1], device=doc_ids.device) < visible_entries(
        index, ratio
    ).unsqueeze(-1)  # [S, C]
    same = (doc_ids.unsqueeze(-1) == entry_doc.unsqueeze(1)) & entry_ok.unsqueeze(1)
    return complete & same


class Indexer(nn.Module):
    """Scores every visible compressed entry for every query and keeps the top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.topk = cfg.index_topk
        self.quant_sim = cfg.quant_sim
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, cfg.quant_sim)
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False)
        self.compressor = Compressor(cfg, ratio=4, head_dim=cfg.index_head_dim)

    def simulate_fp4(self, x: torch.Tensor) -> torch.Tensor:
        """Hadamard rotation + FP4 round trip of indexer q/k (QAT numerics, as the official
        indexer's `rotate_activation` and `fp4_act_quant`)."""
        return fp4_e2m1_roundtrip(hadamard_transform(x)) if self.quant_sim else x

    def queries(self, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, S, d_c] -> [B, S, Hi, Di] with RoPE at the query positions (no normalization)."""
        q = self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))
        return self.simulate_fp4(apply_rope(q, cos, sin))

    def scores(
        self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, budget: int = 1 << 20
    ) -> torch.Tensor:
        """I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]). x: [B, S, dim], q: [B, S, H, D],
        keys: [B, C, D] -> [B, S, C] fp32.

        A few queries at a time, so the per-head logits [B, t, H, C] (at most `budget`
        elements) stay in the CPU cache, with the head sum as a batched matmul. Computed in q's
        dtype: fp32 models in fp32, bf16 models in bf16 as the official inference does.
        """
        batch, length, heads, dim = q.shape
        weights = self.weights_proj(x).float() * (self.head_dim**-0.5 * heads**-0.5)
        keys_t = keys.to(q.dtype).transpose(1, 2)  # [B, D, C]
        step = max(1, budget // max(1, batch * heads * keys.shape[1]))
        out = []
        for i in range(0, length, step):
            qb = q[:, i : i + step]  # [B, t, H, D]
            t = qb.shape[1]
            logits = torch.bmm(qb.reshape(batch, t * heads, dim), keys_t).relu()  # [B, tH, C]
            w = weights[:, i : i + step].reshape(batch * t, 1, heads).to(q.dtype)
            out.append(torch.bmm(w, logits.view(batch * t, heads, -1)).view(batch, t, -1))
        return torch.cat(out, dim=1).float() if len(out) > 1 else out[0].float()

    @staticmethod
    def select(scores: torch.Tensor, n_visible: torch.Tensor, topk: int) -> torch.Tensor:
        """Top-k visible entries per query as a boolean mask [B, S, C].

        scores: [B, S, C]; n_visible: [B or 1, S] entries each query may see. A query with fewer
        visible entries than k simply keeps all of them.
        """
        entry = torch.arange(scores.shape[-1], device=scores.device)
        visible = (entry < n_visible.unsqueeze(-1)).expand(scores.shape)
        return Indexer.select_visible(scores, visible, topk)

    @staticmethod
    def select_visible(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
        """Top-k among the entries `visible` [B, S, C] allows, as a boolean mask [B, S, C]."""
        k = min(topk, scores.shape[-1])
        if k == 0:
            return visible
        masked = scores.masked_fill(~visible, float("-inf"))
        return top_k_mask(masked, k) & visible


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest scores along the last dim (exactly k per row); ties at
    the k-th value go to the lower indices.

    Index scores tie exactly whenever every head's ReLU is zero, and `topk` breaks ties in a
    shape-dependent way; this rule makes the full-sequence forward and the cached decode pick
    the same entries, at the cost of one `topk` (a stable sort would be 10x slower)."""
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above, tied = scores > kth, scores == kth
    room = k - above.sum(dim=-1, keepdim=True)
    surplus = tied.sum(dim=-1, keepdim=True) > room
    if not static_shapes() and not bool(surplus.any()):  # the usual case: no tie to break
        return above | tied
    return above | (tied & (tied.cumsum(dim=-1) <= room))


# ---------------------------------------------------------------------------------------------
# Core attention: sliding window + compressed entries, one softmax with a sink (V4 report)
# ---------------------------------------------------------------------------------------------


def window_attention_blocks(
    q: torch.Tensor, kv: torch.Tensor, window: int, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Scores of every query against its sliding window, computed block by block.

    Queries in block b (of `window` tokens) can only see keys in blocks b-1 and b, so the cost is
    linear in S. q: [B, S, H, D], kv: [B, S, D]. Returns (scores [B, nb, H, W, 2W] with -inf
    outside the window, keys [B, nb, 2W, D]); query t = b*W + i sees key slot j iff i < j <= i+W.
    doc_ids [B, S]: additionally only keys of the query's own document.
    """
    batch, length, heads, dim = q.shape
    if length <= window:
        return _causal_attention_block(q, kv, doc_ids)
    n_blocks = -(-length // window)
    pad = n_blocks * window - length
    q_blocks = F.pad(q, (0, 0, 0, 0, 0, pad)).view(batch, n_blocks, window, heads, dim)
    kv_padded = F.pad(kv, (0, 0, window, pad))  # one block of zeros in front
    keys = kv_padded.unfold(1, 2 * window, window).transpose(-1, -2)  # [B, nb, 2W, D]
    scores = torch.einsum("bnqhd,bnkd->bnhqk", q_blocks, keys)
    i = torch.arange(window, device=q.device).view(window, 1)
    j = torch.arange(2 * window, device=q.device).view(1, 2 * window)
    in_window = (j > i) & (j <= i + window)  # [W, 2W]
    first_block = in_window & (j >= window)  # block 0 has no previous block
    mask = torch.stack([first_block] + [in_window] * (n_blocks - 1))  # [nb, W, 2W]
    mask = mask.unsqueeze(0)  # [1, nb, W, 2W]
    if doc_ids is not None:  # padding slots are outside the window already; any id will do
        query_doc = F.pad(doc_ids, (0, pad)).view(batch, n_blocks, window)
        key_doc = F.pad(doc_ids, (window, pad)).unfold(1, 2 * window, window)  # [B, nb, 2W]
        mask = mask & (query_doc.unsqueeze(-1) == key_doc.unsqueeze(-2))
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    return scores, keys


def _causal_attention_block(q: torch.Tensor, kv: torch.Tensor, doc_ids: torch.Tensor | None
                            ) -> tuple[torch.Tensor, ...]:
    """`window_attention_blocks` for a sequence no longer than the window: one block of S
    queries over its own S keys, causal (short RL and distillation samples would otherwise pay
    for a padded block of `window` queries against 2 * `window` keys)."""
    length = q.shape[1]
    scores = torch.einsum("bqhd,bkd->bhqk", q, kv).unsqueeze(1)  # [B, 1, H, S, S]
    position = torch.arange(length, device=q.device)
    mask = (position.view(1, -1) <= position.view(-1, 1)).view(1, 1, length, length)
    if doc_ids is not None:
        mask = mask & (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)).unsqueeze(1)
    return scores.masked_fill(~mask.unsqueeze(2), float("-inf")), kv.unsqueeze(1)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    window: int,
    entries: torch.Tensor | None = None,
    entry_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    return_entry_probs: bool = False,
):
    """Full-sequence attention of V4: window keys + allowed compressed entries + sink.

    q: [B, S, H, D] (scaled by the caller), kv: [B, S, D] (K = V), sink: [H] logits,
    entries: [B, C, D] compressed K = V, entry_mask: [B, S, C] bool (True = attend),
    doc_ids: [B, S] document of each token (window keys of other documents are masked; the
    caller's entry_mask handles the entries). Returns [B, S, H, D] in q's dtype (softmax fp32);
    with return_entry_probs also the detached fp32 attention probabilities on the entries
    [B, S, H, C] (the indexer's training target).
    """
    batch, length, heads, dim = q.shape
    kv = kv.to(q.dtype)  # under autocast the compressor's fp32 entries meet bf16 queries
    entries = entries.to(q.dtype) if entries is not None else None
    scores, keys = window_attention_blocks(q, kv, window, doc_ids)  # [B, nb, H, W, 2W]
    n_blocks, block, n_keys = scores.shape[1], scores.shape[3], scores.shape[4]
    parts = [scores.float()]
    if entries is not None and entries.shape[1] > 0:
        pad = n_blocks * block - length
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, pad)).view(batch, n_blocks, block, heads, dim)
        entry_scores = torch.einsum("bnqhd,bcd->bnhqc", q_blocks, entries).float()
        allowed = F.pad(entry_mask, (0, 0, 0, pad)).view(batch, n_blocks, 1, block, -1)
        parts.append(entry_scores.masked_fill(~allowed, float("-inf")))
    sink_logits = sink.float().view(1, 1, heads, 1, 1).expand(batch, n_blocks, heads, block, 1)
    probs32 = torch.cat(parts + [sink_logits], dim=-1).softmax(dim=-1)
    probs = probs32.to(q.dtype)
    out = torch.einsum("bnhqk,bnkd->bnqhd", probs[..., :n_keys], keys)
    if len(parts) > 1:
        out = out + torch.einsum("bnhqc,bcd->bnqhd", probs[..., n_keys:-1], entries)
    out = out.reshape(batch, n_blocks * block, heads, dim)[:, :length]
    if not return_entry_probs:
        return out
    n_entries = entries.shape[1] if entries is not None else 0
    entry_probs = probs32[..., n_keys:n_keys + n_entries].detach()  # [B, nb, H, W, C]
    entry_probs = entry_probs.transpose(2, 3).reshape(batch, n_blocks * block, heads, -1)
    return out, entry_probs[:, :length]


# ---------------------------------------------------------------------------------------------
# Attention layer (sliding-only, CSA or HCA)
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, compress_ratio: int):
        super().__init__()
        self.cfg = cfg
        self.ratio = compress_ratio
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.window = cfg.window_size
        self.softmax_scale = cfg.head_dim**-0.5
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, cfg.quant_sim)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, cfg.quant_sim)
        self.wkv = Linear(cfg.dim, cfg.head_dim, cfg.quant_sim)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        group_in = cfg.n_heads * cfg.head_dim // cfg.o_groups
        self.wo_a = nn.Linear(group_in, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, cfg.quant_sim)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads))
        self.compressor = Compressor(cfg, compress_ratio, cfg.head_dim) if compress_ratio else None
        self.indexer = Indexer(cfg) if compress_ratio == 4 else None
        self.register_buffer("inv_freq", rope_inv_freq(cfg, compress_ratio > 0), persistent=False)
        # Lightning Indexer training (CSA layers; see `compressed`). Defaults = inference.
        self.indexer_mode = "sparse"  # or "dense": attend every visible compressed entry

    def simulate_fp8(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 round trip (blocks of 64) of the non-RoPE dims of a KV entry (the V4 KV cache)."""
        if not self.cfg.quant_sim:
            return x
        nope = self.head_dim - self.cfg.rope_head_dim
        return torch.cat((fp8_e4m3_roundtrip(x[..., :nope]), x[..., nope:]), dim=-1)

    # -- pieces shared by the full-sequence forward and a cached decode ----------------------
    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """x: [B, S, dim] -> (q [B, S, H, D] scaled for softmax, kv [B, S, D], q latent)."""
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(rms_scale(q, self.cfg.norm_eps), cos, sin) * self.softmax_scale
        kv = self.simulate_fp8(apply_rope(self.kv_norm(self.wkv(x)), cos, sin))
        return q, kv, q_latent

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Inverse RoPE at the query positions, grouped `wo_a`, then `wo_b`. o: [B, S, H, D]."""
        o = apply_rope(o, cos, -sin)
        groups = o.flatten(2).unflatten(-1, (self.cfg.o_groups, -1))  # [B, S, G, H*D/G]
        weight = self.wo_a.weight.view(self.cfg.o_groups, self.cfg.o_lora_rank, -1)
        latent = torch.einsum("bsgi,goi->bsgo", groups, weight.to(groups.dtype))
        return self.wo_b(latent.flatten(2))

    def compressed(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        cos,
        sin,
        doc_ids: torch.Tensor | None = None,
        indexer_loss: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Compressed entries [B, C, D], which of them each query attends [B, S, C], and the
        index scores [B, S, C] (None on HCA layers).

        Indexer training (V4 report, following V3.2's DSA recipe; the schedule is our decision):
        - `indexer_mode = "dense"` (the warm-up): a CSA layer attends every visible compressed
          entry, like HCA; the indexer still scores them.
        - `indexer_mode = "sparse"`: attention uses the indexer's top-k (the released model).
        - the indexer loss (`forward(..., indexer_loss=True)`): the indexer sees *detached*
          inputs (so the LM loss never trains it and its loss never trains the rest); the loss
          is KL(p || q) per query, averaged over queries: p = the main attention's
          probabilities on the attended entries, summed over heads and L1-normalized
          (detached); q = softmax of the index scores over the same entries (all visible ones
          when dense, the top-k set when sparse).
        """
        if doc_ids is None:
            entries = self.simulate_fp8(self.compressor(x, self.inv_freq))
            n_visible = visible_entries(positions, self.ratio)  # [1, S]
            entry = torch.arange(entries.shape[1], device=x.device)
            visible = (entry < n_visible.unsqueeze(-1)).expand(x.shape[0], -1, -1)
        else:
            entries, entry_doc, entry_ok = self.compressor.forward_documents(
                x, self.inv_freq, positions, doc_ids
            )
            entries = self.simulate_fp8(entries)
            visible = visible_document_entries(doc_ids, entry_doc, entry_ok, self.ratio)
        if self.indexer is None:  # HCA: every visible entry
            return entries, visible, None
        if indexer_loss:
            x, q_latent = x.detach(), q_latent.detach()
        if doc_ids is None:
            keys = self.indexer.compressor(x, self.inv_freq)
        else:
            keys, _, _ = self.indexer.compressor.forward_documents(
                x, self.inv_freq, positions, doc_ids
            )
        q_index = self.indexer.queries(q_latent, cos, sin)
        scores = self.indexer.scores(x, q_index, self.indexer.simulate_fp4(keys))
        if self.indexer_mode == "dense":
            mask = visible
        else:
            mask = Indexer.select_visible(scores, visible, self.indexer.topk)
        return entries, mask, scores

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache=None,
        slots: torch.Tensor | None = None,
        indexer_loss: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, S, dim] (normalized) -> ([B, S, dim], the indexer loss or None).

        Without a cache: the full sequence, positions [1, S] = 0..S-1, or with doc_ids [B, S]
        the document-relative positions [B, S]. With a cache (`inference.cache.LayerCache`): S new
        tokens of each slot [B, 1], positions [B, S] continuing each slot's length; the cache
        supplies the window and compressed entries and stores the new ones.
        indexer_loss: a CSA layer's full-sequence forward also returns its indexer's KL loss
        (see `compressed`); None otherwise, and when no query attends an entry.
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        q, kv, q_latent = self.project(x, cos, sin)
        if cache is not None:
            o = cache.attend(self, x, q, kv, q_latent, positions, slots, cos, sin)
            return self.output(o, cos, sin), None
        entries = mask = scores = None
        if self.compressor is not None:
            entries, mask, scores = self.compressed(
                x, q_latent, positions, cos, sin, doc_ids, indexer_loss
            )
        if not indexer_loss or scores is None:
            o = sparse_attention(q, kv, self.attn_sink, self.window, entries, mask, doc_ids)
            return self.output(o, cos, sin), None
        o, entry_probs = sparse_attention(
            q, kv, self.attn_sink, self.window, entries, mask, doc_ids, return_entry_probs=True
        )
        return self.output(o, cos, sin), indexer_kl_loss(scores, mask, entry_probs)


def indexer_kl_loss(
    scores: torch.Tensor, attended: torch.Tensor, entry_probs: torch.Tensor
) -> torch.Tensor | None:
    """Mean over queries of KL(main attention || indexer) on the attended entries.

    scores: [B, S, C] index scores (with grad); attended: [B, S, C] bool;
    entry_probs: [B, S, H, C] the main attention's probabilities (detached). None when no query
    attends any entry (short sequences)."""
    target = entry_probs.sum(dim=2).masked_fill(~attended, 0.0)  # [B, S, C]
    mass = target.sum(dim=-1, keepdim=True)
    rows = attended.any(dim=-1) & (mass.squeeze(-1) > 0)  # [B, S]
    if not bool(rows.any()):
        return None
    target = target / mass.clamp_min(1e-30)
    log_q = scores.float().masked_fill(~attended, float("-inf")).log_softmax(dim=-1)
    log_q = torch.where(attended, log_q, 0.0)
    log_p = torch.where(target > 0, target.clamp_min(1e-30).log(), 0.0)
    kl = (target * (log_p - log_q)).sum(dim=-1)  # [B, S]
    return kl[rows].mean()


# ---------------------------------------------------------------------------------------------
# MoE: sqrt-softplus router, hash routing, clamped SwiGLU experts (the official `Gate`/`Expert`)
# ---------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU in fp32: silu(min(g, limit)) * clamp(u, -limit, limit)."""
    return F.silu(gate.float().clamp(max=limit)) * up.float().clamp(-limit, limit)


class Expert(nn.Module):
    """The shared expert (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, dim: int, inter_dim: int, limit: float, quant_sim: bool = False):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim, quant_sim)
        self.w2 = Linear(inter_dim, dim, quant_sim)
        self.w3 = Linear(dim, inter_dim, quant_sim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))


class RoutedExperts(nn.Module):
    """E experts stored stacked: w1, w3 [E, inter, dim], w2 [E, dim, inter]."""

    def __init__(
        self, n_experts: int, dim: int, inter_dim: int, limit: float, quant_sim: bool = False
    ):
        super().__init__()
        self.limit = limit
        self.quant_sim = quant_sim
        self.w1 = nn.Parameter(torch.zeros(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.zeros(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.zeros(n_experts, inter_dim, dim))

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, dim]; indices, weights: [T, k]. Tokens are grouped by expert (sorted once);
        few tokens (decode) and static shapes (compiled decode) go to `forward_static`."""
        k = indices.shape[1]
        if static_shapes() or x.shape[0] * k <= self.w1.shape[0]:  # decode-sized batches
            return self.forward_static(x, indices, weights)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()
        token_of = order // k
        routed_w = weights.flatten()[order].float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # fp32 accumulation
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            xe = act_quant(x[rows]) if self.quant_sim else x[rows]
            h = swiglu(
                F.linear(xe, self.w1[e].to(x.dtype)),
                F.linear(xe, self.w3[e].to(x.dtype)),
                self.limit,
            )
            h = h * routed_w[start : start + count, None]  # weight on h, as the reference
            h = act_quant(h.to(x.dtype)) if self.quant_sim else h.to(x.dtype)
            out.index_add_(0, rows, F.linear(h, self.w2[e].to(x.dtype)).float())
            start += count
        return out.to(x.dtype)


    def forward_static(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The same sum without data-dependent shapes: with few (token, expert) pairs each pair
        gets its expert's weights gathered (a batched matmul), otherwise every expert runs on
        every token with weight 0 where it was not chosen."""
        tokens, k = indices.shape
        n_experts = self.w1.shape[0]
        quant = act_quant if self.quant_sim else (lambda t: t)
        if tokens * k <= n_experts:
            chosen = indices.flatten()  # [Tk]
            xe = quant(x.repeat_interleave(k, dim=0)).unsqueeze(-1)  # [Tk, dim, 1]
            gate = torch.bmm(self.w1[chosen].to(x.dtype), xe).squeeze(-1)
            up = torch.bmm(self.w3[chosen].to(x.dtype), xe).squeeze(-1)
            h = swiglu(gate, up, self.limit) * weights.reshape(-1, 1).float()
            h = quant(h.to(x.dtype)).unsqueeze(-1)  # [Tk, inter, 1]
            out = torch.bmm(self.w2[chosen].to(x.dtype), h).squeeze(-1).float()
            return out.view(tokens, k, -1).sum(dim=1).to(x.dtype)
        route = weights.new_zeros(tokens, n_experts).scatter(1, indices, weights.float())
        xq = quant(x)
        gate = torch.matmul(xq, self.w1.to(x.dtype).transpose(1, 2))  # [E, T, inter]
        up = torch.matmul(xq, self.w3.to(x.dtype).transpose(1, 2))
        h = swiglu(gate, up, self.limit) * route.t().unsqueeze(-1)
        out = torch.matmul(quant(h.to(x.dtype)), self.w2.to(x.dtype).transpose(1, 2))
        return out.float().sum(dim=0).to(x.dtype)


class Gate(nn.Module):
    """Router. Learned top-k on (score + bias), or hash routing via `tid2eid` in the first layers.

    Gate weights are the unbiased scores of the chosen experts, renormalized, times route_scale.
    """

    def __init__(self, cfg: ModelConfig, hash_routed: bool):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.hash_routed = hash_routed
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.dim))
        if hash_routed:
            # Frozen token-id -> experts table; a persistent buffer so it is always checkpointed.
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        if self.score_func == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """x: [T, dim] -> (weights [T, k] fp32, indices [T, k], scores [T, E] fp32).

        forced [T, k]: use these experts (routing replay) instead of choosing them.
        """
        scores = self.scores(x)
        if forced is not None:
            if forced.shape != (x.shape[0], self.topk):
                raise ValueError(f"forced routing of shape {tuple(forced.shape)} for "
                                 f"{x.shape[0]} tokens: expected {(x.shape[0], self.topk)}")
            indices = forced.to(scores.device)
        elif self.hash_routed:
            if input_ids is None:
                raise ValueError("hash-routed MoE layers need the token ids (input_ids)")
            indices = self.tid2eid[input_ids.flatten()]
        else:
            indices = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.score_func != "softmax":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


class Routing(NamedTuple):
    """How one MoE layer routed its T = B * S tokens. A NamedTuple rather than a dataclass:
    torch.compile and FSDP's output hooks see through tuples."""

    indices: torch.Tensor  # [T, k] the chosen experts
    scores: torch.Tensor  # [T, E] fp32 router scores (without the bias), with their graph


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool):
        super().__init__()
        self.gate = Gate(cfg, hash_routed)
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit, cfg.quant_sim
        )
        self.shared_experts = (
            Expert(
                cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg.swiglu_limit, cfg.quant_sim
            )
            if cfg.n_shared_experts
            else None
        )

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing]:
        """x: [B, S, dim] -> (same shape, how its B * S tokens were routed).

        forced [B, S, k]: route to these experts (replay) instead of choosing them."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if forced is not None:
            forced = forced.reshape(-1, forced.shape[-1])
        weights, indices, scores = self.gate(flat, input_ids, forced)
        out = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape), Routing(indices, scores)


# ---------------------------------------------------------------------------------------------
# Block, MTP block, model
# ---------------------------------------------------------------------------------------------


@dataclass
class Signals:
    """What a forward reports beside its logits when asked (`Transformer.forward(...,
    signals=True)`, or the `collect` argument of `hidden_streams`): what the balance loss, the
    expert-load statistics, the indexer loss and the RL rollouts' recorded routing need.
    Filled layer by layer, main layers first."""

    routing: list[Routing] = field(default_factory=list)  # one per main layer, in order
    mtp_routing: list[Routing] = field(default_factory=list)  # the MTP block's, when it ran
    indexer_losses: list[torch.Tensor] = field(default_factory=list)  # CSA layers, then MTP

    def add(self, routing: Routing, indexer_loss: torch.Tensor | None, mtp: bool = False
            ) -> None:
        (self.mtp_routing if mtp else self.routing).append(routing)
        if indexer_loss is not None:
            self.indexer_losses.append(indexer_loss)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, compress_ratio: int, hash_routed: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, compress_ratio)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, hash_routed)
        rows = (2 + cfg.hc_mult) * cfg.hc_mult
        hc_params(self, "hc_attn", cfg, rows)
        hc_params(self, "hc_ffn", cfg, rows)
        self.hc = HyperConnection(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        input_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None = None,
        cache=None,
        slots: torch.Tensor | None = None,
        forced: torch.Tensor | None = None,
        indexer_loss: bool = False,
    ) -> tuple[torch.Tensor, Routing, torch.Tensor | None]:
        """x: [B, S, N, dim] residual streams -> (same shape, the MoE's routing, the indexer
        loss or None). cache, slots, indexer_loss: see Attention; forced: see MoE."""
        h, post, comb = self.hc.pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        attn_out, attn_loss = self.attn(
            self.attn_norm(h), positions, doc_ids, cache, slots, indexer_loss
        )
        x = self.hc.post(attn_out, x, post, comb)
        h, post, comb = self.hc.pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        ffn_out, routing = self.ffn(self.ffn_norm(h), input_ids, forced)
        return self.hc.post(ffn_out, x, post, comb), routing, attn_loss


class MTPBlock(Block):
    """Depth-1 multi-token prediction (as in V3): predicts token t+2 from the main model's final
    4-stream state at t and the embedding of token t+1. Shares embedding and head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.mtp_compress_ratio, hash_routed=False)
        self.e_proj = Linear(cfg.dim, cfg.dim, cfg.quant_sim)
        self.h_proj = Linear(cfg.dim, cfg.dim, cfg.quant_sim)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hc_params(self, "hc_head", cfg, cfg.hc_mult)

    def forward(
        self,
        x: torch.Tensor,
        next_embed: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache=None,
        slots: torch.Tensor | None = None,
        indexer_loss: bool = False,
    ) -> tuple[torch.Tensor, Routing, torch.Tensor | None]:
        """x: [B, S, N, dim] main final streams; next_embed: [B, S, dim] embedding of token t+1.
        Returns the normalized hidden state [B, S, dim] fed to the shared head, with the
        routing and indexer loss as `Block.forward`."""
        streams = self.h_proj(self.hnorm(x)) + self.e_proj(self.enorm(next_embed)).unsqueeze(-2)
        streams, routing, attn_loss = super().forward(
            streams, positions, None, doc_ids, cache, slots, indexer_loss=indexer_loss
        )
        eps = self.hc.hc_eps, self.hc.norm_eps
        streams = hc_head(
            streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, *eps,
            plain=self.hc.plain,
        )
        return self.norm(streams), routing, attn_loss


class Transformer(nn.Module):
    """DeepSeek-V4. `forward(input_ids)` returns fp32 logits [B, S, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg, cfg.compress_ratios[i], hash_routed=i < cfg.n_hash_layers)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        hc_params(self, "hc_head", cfg, cfg.hc_mult)
        self.mtp = nn.ModuleList(MTPBlock(cfg) for _ in range(cfg.n_mtp_layers))
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    # -- initialization for training from scratch -------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Fresh weights: N(0, std) matrices, unit norms, zero sinks/biases/ape; mHC starting near
        an identity residual (pre ~ 1/N, post ~ 1, comb ~ 0.9 on the diagonal, gates 0.01);
        a random hash table with distinct experts per token."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        n = self.cfg.hc_mult
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ape", "attn_sink", "bias"):
                p.zero_()
            elif leaf.endswith("_base"):
                p.copy_(hc_base_init(n, p.numel()))
            elif leaf.endswith("_scale"):
                p.fill_(0.01)
            elif leaf.endswith("_fn") or p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:  # norm weights
                p.fill_(1.0)
        for module in self.modules():
            if isinstance(module, Gate) and module.hash_routed:
                module.tid2eid.copy_(random_hash_table(self.cfg, gen))

    # -- forward ----------------------------------------------------------------------------
    def hidden_streams(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache=None,
        slots: torch.Tensor | None = None,
        routing: torch.Tensor | None = None,
        collect: Signals | None = None,
    ) -> torch.Tensor:
        """Final mHC residual streams [B, S, N, dim] (before the HC head).

        With a cache (`inference.cache.KVCache`), input_ids are S new tokens for each of the cache
        slots [B], each continuing from its own length; the cache advances by S.
        routing [n_layers, B, S, k]: replay these experts (see `forward`). collect: a `Signals`
        to add each layer's routing and indexer loss to (the loss only without a cache).
        """
        positions = self.new_positions(input_ids, doc_ids, cache, slots)
        n = len(self.layers)
        layer_caches = cache.layers if cache is not None else [None] * n
        if routing is not None:
            self.check_routing(routing, input_ids)
        forced = routing if routing is not None else [None] * n
        h = self.embed(input_ids)
        x = h.unsqueeze(-2).expand(*h.shape[:-1], self.cfg.hc_mult, h.shape[-1]).contiguous()
        for layer, layer_cache, chosen in zip(self.layers, layer_caches, forced):
            x, layer_routing, indexer_loss = layer(
                x, positions, input_ids, doc_ids, layer_cache, column(slots), chosen,
                indexer_loss=collect is not None,
            )
            if collect is not None:
                collect.add(layer_routing, indexer_loss)
        if cache is not None:
            cache.advance(slots, input_ids.shape[1])
        return x

    def mtp_hidden(
        self,
        streams: torch.Tensor,
        next_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache=None,
        slots: torch.Tensor | None = None,
        collect: Signals | None = None,
    ) -> torch.Tensor:
        """The MTP block's normalized hidden state [B, S, dim]: position t takes the main
        model's final streams [B, S, N, dim] at t and token t+1 (next_ids [B, S]), and predicts
        token t+2. With a cache: its MTP layer, which lags the main layers by one token.
        collect: as `hidden_streams` (the block's routing goes to `Signals.mtp_routing`)."""
        positions = self.new_positions(next_ids, doc_ids, cache, slots, mtp=True)
        mtp_cache = cache.mtp[0] if cache is not None else None
        hidden, routing, indexer_loss = self.mtp[0](
            streams, self.embed(next_ids), positions, doc_ids, mtp_cache, column(slots),
            indexer_loss=collect is not None,
        )
        if collect is not None:
            collect.add(routing, indexer_loss, mtp=True)
        if cache is not None:
            cache.advance(slots, next_ids.shape[1], mtp=True)
        return hidden

    def new_positions(self, input_ids, doc_ids, cache, slots, mtp: bool = False) -> torch.Tensor:
        """RoPE positions of the tokens a forward feeds: from 0 (or document-relative) without
        a cache, else after each slot's cached tokens (checking the capacity)."""
        if cache is None:
            return self.positions(input_ids, doc_ids)
        if doc_ids is not None:
            raise ValueError("doc_ids (packed documents) is for full-sequence forwards, not a "
                             "cache")
        return cache.reserve(slots, input_ids.shape[1], mtp=mtp)

    @staticmethod
    def positions(input_ids: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """RoPE positions: [1, S] = 0..S-1, or document-relative [B, S] with doc_ids."""
        if doc_ids is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if doc_ids.shape != input_ids.shape:
            raise ValueError(
                f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        return document_positions(doc_ids)

    # -- training switches --------------------------------------------------------------------
    def set_indexer_mode(self, mode: str = "sparse") -> None:
        """CSA layers attend the indexer's top-k ("sparse") or every visible entry ("dense"),
        see `Attention.compressed`. (The indexer loss is asked per forward.)"""
        if mode not in ("sparse", "dense"):
            raise ValueError(f"indexer mode {mode!r}: must be 'sparse' or 'dense'")
        for module in self.modules():
            if isinstance(module, Attention) and module.indexer is not None:
                module.indexer_mode = mode

    def check_routing(self, routing: torch.Tensor, input_ids: torch.Tensor) -> None:
        """A replayed routing must name k experts for every main layer and token."""
        n, k = len(self.layers), self.cfg.n_activated_experts
        if routing.shape != (n, *input_ids.shape, k):
            raise ValueError(f"routing of shape {tuple(routing.shape)}: expected "
                             f"[n_layers={n}, batch, seq, k={k}] = {(n, *input_ids.shape, k)}")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits from an fp32 GEMM, as the official head computes them (bf16 logits
        would carry ~0.4% error into log-probs and top-p); `cast_model` keeps the head fp32."""
        return as_float(F.linear(as_float(hidden), as_float(self.head.weight)))  # autocast too

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        """HC head then the final norm: [B, S, N, dim] -> [B, S, dim]."""
        eps = self.cfg.hc_eps, self.cfg.norm_eps
        plain = self.cfg.hc_plain_residual
        return self.norm(
            hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, *eps, plain=plain)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        mtp_input_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        routing: torch.Tensor | None = None,
        signals: bool = False,
    ):
        """input_ids: [B, S] -> logits [B, S, V] (fp32).

        With `mtp_input_ids` [B, S] (the token that follows each input position, i.e. the
        next-token targets), also returns the MTP block's logits [B, S, V], where position t
        predicts token t+2: `(logits, mtp_logits)`.
        doc_ids [B, S]: packed documents (runs of equal ids) that never attend to each other.
        routing [n_layers, B, S, k]: the main layers' MoEs use these experts instead of
        choosing (routing replay: an RL training forward routes every token as the rollout
        did); gate weights still come from the current scores, so gradients flow as usual.
        signals: return `(the above, Signals)`: each layer's routing and indexer loss.
        """
        self.check_ids(input_ids)
        collect = Signals() if signals else None
        x = self.hidden_streams(input_ids, doc_ids, routing=routing, collect=collect)
        out = self.logits(self.collapse(x))
        if mtp_input_ids is not None:
            if not len(self.mtp):
                raise ValueError("this model has no MTP block (n_mtp_layers=0)")
            self.check_ids(mtp_input_ids, like=input_ids)
            out = out, self.logits(self.mtp_hidden(x, mtp_input_ids, doc_ids, collect=collect))
        return out if collect is None else (out, collect)

    def check_ids(self, ids: torch.Tensor, like: torch.Tensor | None = None) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"token ids must be an integer tensor [batch, seq], "
                f"got {ids.dtype} {tuple(ids.shape)}"
            )
        if like is not None and ids.shape != like.shape:
            raise ValueError(
                f"mtp_input_ids shape {tuple(ids.shape)} != input_ids shape {tuple(like.shape)}"
            )
        if not ids.numel():
            return
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= self.cfg.vocab_size:
            bad = lowest if lowest < 0 else highest
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.cfg.vocab_size})")


def column(slots: torch.Tensor | None) -> torch.Tensor | None:
    """Cache slots [B] as the [B, 1] index that broadcasts against positions [B, T]."""
    return None if slots is None else slots.unsqueeze(1)


# Parameters the official inference code holds in fp32 whatever the weights' dtype: the release
# stores the routing bias, mHC, the attention sinks and the compressors' `ape` in F32 (the bias
# moves in steps of 0.001, below bf16 spacing once |b| >= 0.25, so bf16 would flip near-tied
# experts); the compressors' projections and the head ship in BF16 but are computed in fp32.
_FP32_PARAMS = re.compile(
    r"(attn_sink|gate\.bias|\.ape|(^|\.)hc_\w+|compressor\.w(kv|gate)\.weight|^head\.weight)$")


def keeps_fp32(name: str) -> bool:
    """True for a parameter (state-dict name) that stays fp32 in a bf16/fp16 model."""
    return bool(_FP32_PARAMS.search(name))


def cast_model(model: nn.Module, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """`model.to(device, dtype)` except that `keeps_fp32` parameters become fp32 (an exact
    upcast; never through `dtype`) and buffers keep their dtype (the RoPE tables stay fp32)."""
    model.to(device=device)
    if dtype is None:
        return model
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model


def rebuild_rope_tables(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute the RoPE tables, non-persistent buffers that a model built on the meta device
    and filled from a state dict lacks."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.inv_freq = rope_inv_freq(module.cfg, module.ratio > 0).to(device)


def hc_base_init(n: int, rows: int) -> torch.Tensor:
    """Static mHC biases giving pre = 1/N, post = 1 and a comb matrix ~0.9 on its diagonal."""
    pre = torch.full((n,), math.log(1 / (n - 1))) if n > 1 else torch.full((1,), 10.0)
    if rows == n:  # HC head: only `pre`
        return pre
    post = torch.zeros(n)
    comb = torch.eye(n) * math.log(9 * max(n - 1, 1))
    return torch.cat((pre, post, comb.flatten()))


def random_hash_table(cfg: ModelConfig, gen: torch.Generator | None) -> torch.Tensor:
    """tid2eid [vocab, k]: k distinct random experts per token id."""
    noise = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen)
    return noise.argsort(dim=-1)[:, : cfg.n_activated_experts].contiguous()
