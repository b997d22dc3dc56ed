"""The DeepSeek-V4 network, top to bottom, in the order data flows.

norms -> RoPE/YaRN -> mHC -> compressor -> indexer -> attention -> MoE -> block -> MTP -> model.

Parameter names follow the official checkpoint (`embed`, `layers.L.attn.wq_a`, `layers.L.ffn.gate`,
`mtp.0.e_proj`, ...), except that routed experts are stacked per layer (`ffn.experts.w1` is
`[E, inter, dim]`), so an expert matmul is one indexed weight and Muon can treat each expert
matrix on its own. Shapes in comments: B batch, S sequence, H heads, D head dim, C compressed
entries, N mHC streams.

Everything here is a full-sequence (training / scoring) forward. The attention is split into
projection, compression, selection and the core sparse attention so that an inference cache can
feed its own window and compressed entries into the same pieces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.kernels import fp4_e2m1_roundtrip, fp8_e4m3_roundtrip, hadamard_transform

# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in fp32 (spec §13), result in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS normalization over the last dim (per-head queries), in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class Linear(nn.Linear):
    """A bias-free linear layer whose weights ship in FP8 in the official checkpoints.

    With `quant_sim` its input is FP8-quantized per 1x128 block first, as the reference's
    FP8 GEMM does (spec §8); otherwise it is a plain `nn.Linear`.
    """

    def __init__(self, in_features: int, out_features: int, quant_sim: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.quant_sim = quant_sim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(act_quant(x) if self.quant_sim else x)


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """FP8 round trip of activations in 1x128 blocks along the input dim (spec §8)."""
    return fp8_e4m3_roundtrip(x, block=128)


# ---------------------------------------------------------------------------------------------
# RoPE with per-layer tables (spec §4.2)
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
# mHC: manifold-constrained hyper-connections (spec §10)
# ---------------------------------------------------------------------------------------------


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., N, N] logits to a (near) doubly-stochastic matrix, in the kernel's order:
    row softmax + eps, column normalization, then (iters - 1) x (row, column)."""
    m = logits.softmax(dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def hc_mix(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """fn . RMS-normalized vec(X), fp32. x: [B, S, N, d] -> [B, S, fn.shape[0]]."""
    flat = x.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn.float())


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

    def pre(self, x: torch.Tensor, fn, base, scale) -> tuple[torch.Tensor, ...]:
        """x: [B, S, N, d] -> (block input [B, S, d], post [B, S, N], comb [B, S, N, N])."""
        n = self.n
        mix = hc_mix(x, fn, self.norm_eps)
        base, scale = base.float(), scale.float()
        pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2 * torch.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb_logits = (mix[..., 2 * n :] * scale[2] + base[2 * n :]).unflatten(-1, (n, n))
        comb = sinkhorn(comb_logits, self.iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * x.float()).sum(dim=-2).to(x.dtype)
        return collapsed, post, comb

    @staticmethod
    def post(
        y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """New stream j = post_j * y + sum_i comb[i, j] * X_i (comb's first index = source)."""
        mixed = torch.einsum("...ij,...id->...jd", comb, x.float())
        return (post.unsqueeze(-1) * y.float().unsqueeze(-2) + mixed).to(x.dtype)


def hc_head(x: torch.Tensor, fn, base, scale, hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the N streams (no post/comb): sum_i (sigmoid(.) + eps)_i X_i."""
    mix = hc_mix(x, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=-2).to(x.dtype)


def hc_params(module: nn.Module, prefix: str, cfg: ModelConfig, rows: int) -> None:
    """Register `{prefix}_fn [rows, N*d]`, `{prefix}_base [rows]`, `{prefix}_scale` (fp32)."""
    n_scales = 3 if rows == (2 + cfg.hc_mult) * cfg.hc_mult else 1
    module.register_parameter(
        f"{prefix}_fn", nn.Parameter(torch.zeros(rows, cfg.hc_mult * cfg.dim))
    )
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.zeros(rows)))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.ones(n_scales)))


# ---------------------------------------------------------------------------------------------
# Compressor (CSA ratio 4 with overlapping windows, HCA ratio 128) — spec §6.1, §7
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
        """Per-token kv and gate rows in fp32; gate gets `ape[slot in window]`. x: [B, S, dim]."""
        kv = self.wkv(x).float()
        gate = self.wgate(x).float() + self.ape.float()[positions % self.ratio]
        return kv, gate

    def finish(
        self, pooled: torch.Tensor, first_entry: int, inv_freq: torch.Tensor
    ) -> torch.Tensor:
        """RMSNorm, then RoPE at entry position i*ratio. pooled: [B, n, D] -> [B, n, D]."""
        entries = self.norm(pooled)
        positions = (torch.arange(pooled.shape[1], device=pooled.device) + first_entry) * self.ratio
        cos, sin = rope_cos_sin(inv_freq, positions.unsqueeze(0))
        return apply_rope(entries, cos, sin)

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Entries of every complete window of a sequence starting at position 0: [B, S//r, D]."""
        n = x.shape[1] // self.ratio
        positions = torch.arange(n * self.ratio, device=x.device)
        kv, gate = self.project(x[:, : n * self.ratio], positions)
        pooled = compress_windows(kv, gate, self.ratio, self.overlap)
        return self.finish(pooled, 0, inv_freq)


# ---------------------------------------------------------------------------------------------
# Lightning Indexer (CSA layers) — spec §6.2
# ---------------------------------------------------------------------------------------------


def visible_entries(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries query t may use: (t + 1) // ratio (the code's rule)."""
    return torch.div(positions + 1, ratio, rounding_mode="floor")


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
        """Hadamard rotation + FP4 round trip of indexer q/k (QAT numerics, spec §8)."""
        return fp4_e2m1_roundtrip(hadamard_transform(x)) if self.quant_sim else x

    def queries(self, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, S, d_c] -> [B, S, Hi, Di] with RoPE at the query positions (no normalization)."""
        q = self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))
        return self.simulate_fp4(apply_rope(q, cos, sin))

    def scores(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]), fp32. -> [B, S, C]."""
        weights = self.weights_proj(x).float() * (self.head_dim**-0.5 * self.n_heads**-0.5)
        logits = torch.einsum("bshd,bcd->bshc", q.float(), keys.float()).relu()
        return torch.einsum("bshc,bsh->bsc", logits, weights)

    @staticmethod
    def select(scores: torch.Tensor, n_visible: torch.Tensor, topk: int) -> torch.Tensor:
        """Top-k visible entries per query as a boolean mask [B, S, C].

        scores: [B, S, C]; n_visible: [B or 1, S] entries each query may see. A query with fewer
        visible entries than k simply keeps all of them.
        """
        n_entries = scores.shape[-1]
        k = min(topk, n_entries)
        entry = torch.arange(n_entries, device=scores.device)
        visible = (entry < n_visible.unsqueeze(-1)).expand(scores.shape)
        if k == 0:
            return visible
        masked = scores.masked_fill(~visible, float("-inf"))
        chosen = masked.topk(k, dim=-1).indices
        selected = torch.zeros_like(visible).scatter_(-1, chosen, True)
        return selected & visible


# ---------------------------------------------------------------------------------------------
# Core attention: sliding window + compressed entries, one softmax with a sink (spec §4.3)
# ---------------------------------------------------------------------------------------------


def window_attention_blocks(
    q: torch.Tensor, kv: torch.Tensor, window: int
) -> tuple[torch.Tensor, ...]:
    """Scores of every query against its sliding window, computed block by block.

    Queries in block b (of `window` tokens) can only see keys in blocks b-1 and b, so the cost is
    linear in S. q: [B, S, H, D], kv: [B, S, D]. Returns (scores [B, nb, H, W, 2W] with -inf
    outside the window, keys [B, nb, 2W, D]); query t = b*W + i sees key slot j iff i < j <= i+W.
    """
    batch, length, heads, dim = q.shape
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
    scores = scores.masked_fill(~mask.view(1, n_blocks, 1, window, 2 * window), float("-inf"))
    return scores, keys


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    sink: torch.Tensor,
    window: int,
    entries: torch.Tensor | None = None,
    entry_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-sequence attention of V4: window keys + allowed compressed entries + sink.

    q: [B, S, H, D] (scaled by the caller), kv: [B, S, D] (K = V), sink: [H] logits,
    entries: [B, C, D] compressed K = V, entry_mask: [B, S, C] bool (True = attend).
    Returns [B, S, H, D] in q's dtype. Softmax in fp32.
    """
    batch, length, heads, dim = q.shape
    kv = kv.to(q.dtype)  # under autocast the compressor's fp32 entries meet bf16 queries
    entries = entries.to(q.dtype) if entries is not None else None
    scores, keys = window_attention_blocks(q, kv, window)  # [B, nb, H, W, 2W]
    n_blocks = scores.shape[1]
    parts = [scores.float()]
    if entries is not None and entries.shape[1] > 0:
        pad = n_blocks * window - length
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, pad)).view(batch, n_blocks, window, heads, dim)
        entry_scores = torch.einsum("bnqhd,bcd->bnhqc", q_blocks, entries).float()
        allowed = F.pad(entry_mask, (0, 0, 0, pad)).view(batch, n_blocks, 1, window, -1)
        parts.append(entry_scores.masked_fill(~allowed, float("-inf")))
    sink_logits = sink.float().view(1, 1, heads, 1, 1).expand(batch, n_blocks, heads, window, 1)
    probs = torch.cat(parts + [sink_logits], dim=-1).softmax(dim=-1).to(q.dtype)
    out = torch.einsum("bnhqk,bnkd->bnqhd", probs[..., : 2 * window], keys)
    if len(parts) > 1:
        out = out + torch.einsum("bnhqc,bcd->bnqhd", probs[..., 2 * window : -1], entries)
    return out.reshape(batch, n_blocks * window, heads, dim)[:, :length]


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

    def simulate_fp8(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 round trip (blocks of 64) of the non-RoPE dims of a KV entry (spec §8)."""
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
        self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, cos, sin
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed entries [B, C, D] and which of them each query attends [B, S, C]."""
        entries = self.simulate_fp8(self.compressor(x, self.inv_freq))
        n_visible = visible_entries(positions, self.ratio)  # [1, S]
        if self.indexer is None:  # HCA: every visible entry
            mask = torch.arange(entries.shape[1], device=x.device) < n_visible.unsqueeze(-1)
            return entries, mask.expand(x.shape[0], -1, -1)
        keys = self.indexer.simulate_fp4(self.indexer.compressor(x, self.inv_freq))
        q_index = self.indexer.queries(q_latent, cos, sin)
        scores = self.indexer.scores(x, q_index, keys)
        return entries, Indexer.select(scores, n_visible, self.indexer.topk)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Full-sequence forward. x: [B, S, dim] (normalized), positions: [1, S] = 0..S-1."""
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        q, kv, q_latent = self.project(x, cos, sin)
        entries = mask = None
        if self.compressor is not None:
            entries, mask = self.compressed(x, q_latent, positions, cos, sin)
        o = sparse_attention(q, kv, self.attn_sink, self.window, entries, mask)
        return self.output(o, cos, sin)


# ---------------------------------------------------------------------------------------------
# MoE: sqrt-softplus router, hash routing, clamped SwiGLU experts (spec §11)
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
        """x: [T, dim]; indices, weights: [T, k]. Tokens are grouped by expert (sorted once)."""
        k = indices.shape[1]
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

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """x: [T, dim] -> (weights [T, k] fp32, indices [T, k], scores [T, E] fp32)."""
        scores = self.scores(x)
        if self.hash_routed:
            if input_ids is None:
                raise ValueError("hash-routed MoE layers need the token ids (input_ids)")
            indices = self.tid2eid[input_ids.flatten()]
        else:
            indices = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.score_func != "softmax":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


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
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, scores)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat, input_ids)
        self.last_routing = (indices, scores)  # read by training for balancing statistics
        out = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


# ---------------------------------------------------------------------------------------------
# Block, MTP block, model
# ---------------------------------------------------------------------------------------------


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
        self, x: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """x: [B, S, N, dim] residual streams -> same shape."""
        h, post, comb = self.hc.pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        x = self.hc.post(self.attn(self.attn_norm(h), positions), x, post, comb)
        h, post, comb = self.hc.pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        return self.hc.post(self.ffn(self.ffn_norm(h), input_ids), x, post, comb)


class MTPBlock(Block):
    """Depth-1 multi-token prediction (spec §12): predicts token t+2 from the main model's final
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
        self, x: torch.Tensor, next_embed: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """x: [B, S, N, dim] main final streams; next_embed: [B, S, dim] embedding of token t+1.
        Returns the normalized hidden state [B, S, dim] fed to the shared head."""
        streams = self.h_proj(self.hnorm(x)) + self.e_proj(self.enorm(next_embed)).unsqueeze(-2)
        streams = super().forward(streams, positions, None)
        eps = self.hc.hc_eps, self.hc.norm_eps
        streams = hc_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, *eps)
        return self.norm(streams)


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
    def hidden_streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final mHC residual streams [B, S, N, dim] (before the HC head)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h = self.embed(input_ids)
        x = h.unsqueeze(-2).expand(*h.shape[:-1], self.cfg.hc_mult, h.shape[-1]).contiguous()
        for layer in self.layers:
            x = layer(x, positions, input_ids)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head.weight.to(hidden.dtype)).float()

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        """HC head then the final norm: [B, S, N, dim] -> [B, S, dim]."""
        eps = self.cfg.hc_eps, self.cfg.norm_eps
        return self.norm(hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, *eps))

    def forward(self, input_ids: torch.Tensor, mtp_input_ids: torch.Tensor | None = None):
        """input_ids: [B, S] -> logits [B, S, V] (fp32).

        With `mtp_input_ids` [B, S] (the token that follows each input position, i.e. the
        next-token targets), also returns the MTP block's logits [B, S, V], where position t
        predicts token t+2: `(logits, mtp_logits)`.
        """
        self.check_ids(input_ids)
        x = self.hidden_streams(input_ids)
        logits = self.logits(self.collapse(x))
        if mtp_input_ids is None:
            return logits
        if not len(self.mtp):
            raise ValueError("this model has no MTP block (n_mtp_layers=0)")
        self.check_ids(mtp_input_ids, like=input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mtp_hidden = self.mtp[0](x, self.embed(mtp_input_ids), positions)
        return logits, self.logits(mtp_hidden)

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
