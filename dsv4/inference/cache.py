"""The hybrid KV cache of DeepSeek-V4 and the cached attention core (V4 report: KV cache).

Per attention layer and per sequence slot the cache holds:

* the sliding-window ring: the last `window + slack` KV rows (every layer);
* compressed entries: one per `ratio` tokens (CSA main entries and Lightning-Indexer keys;
  HCA entries), preallocated for the slot's capacity;
* the compressor rows ring: the last `2*ratio + slack` (CSA, overlapping windows) or
  `ratio + slack` (HCA) projected kv/gate rows in fp32 — the compressor's tail state.

Every ring is indexed by absolute position (`position % ring_size`), so the cache state of a
sequence is a function of its length alone: truncating a sequence back to an earlier length
(a rejected speculative draft, a reused prefix) only lowers the length. The rows it then needs
(the window before it, the incomplete compression window and, for CSA, the window before that)
are still in the rings as long as the sequence never ran more than `slack` tokens past the new
length; entries past the new length are recomputed when their windows complete again.

Sequences in a batch have their own lengths (no left padding: padding would leak into the
compressor windows). A forward step processes T new tokens for each of B slots, each starting
at its own length; queries attend their window, then either every visible compressed entry
(HCA, or CSA while it has at most top-k of them) or the indexer's top-k gathered per query, so
a prefill chunk costs O(T * (window + top-k + visible/ratio)) — no T x T or S x S matrices.

Optional FP8 storage (`kv_fp8=True`) keeps the non-RoPE dims of window rows and main entries as
FP8 E4M3 with one UE8M0 (power-of-two) scale byte per 64 values (official `act_quant`); RoPE
dims stay in the cache dtype. With `quant_sim` models this is lossless: the model already rounds KV
through the same FP8 grid, and re-quantizing a value on that grid returns it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.errors import Error
from dsv4.model.config import ModelConfig
from dsv4.model.network import (
    Attention,
    Compressor,
    apply_rope,
    compress_windows,
    rope_cos_sin,
    static_shapes,
    top_k_mask,
)
from dsv4.model.numerics import FP8_AMAX_FLOOR, FP8_E4M3_MAX, ue8m0_scale

DEFAULT_SLACK = 64  # how many tokens a sequence can be truncated back (speculation, prefixes)
KV_FP8_BLOCK = 64  # FP8 KV entries: one UE8M0 scale byte per 64 values (official `act_quant`)


class CacheError(Error, ValueError):
    """A request the cache cannot serve (capacity exceeded, truncation too far back)."""


# ---------------------------------------------------------------------------------------------
# Storage: rows addressed by (slot, index), optionally FP8 in the non-RoPE dims
# ---------------------------------------------------------------------------------------------


class RowStore:
    """A [slots, n, width] tensor of rows; with `fp8_dims` > 0 the first `fp8_dims` columns are
    kept as FP8 E4M3 codes with one UE8M0 scale byte (biased exponent) per 64 columns."""

    def __init__(self, slots: int, n: int, width: int, dtype, device, fp8_dims: int = 0):
        self.dtype, self.fp8_dims = dtype, fp8_dims
        plain = width - fp8_dims
        self.plain = torch.zeros(slots, n, plain, dtype=dtype, device=device)
        if fp8_dims:
            self.codes = torch.zeros(slots, n, fp8_dims, dtype=torch.float8_e4m3fn, device=device)
            self.exponents = torch.zeros(slots, n, fp8_dims // KV_FP8_BLOCK, dtype=torch.uint8,
                                         device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.plain] + ([self.codes, self.exponents] if self.fp8_dims else [])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def row_bytes(self) -> int:
        return self.nbytes() // (self.plain.shape[0] * self.plain.shape[1])

    def write(self, slots: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows [..., width] to (slots, index), broadcast together: [B, 1] and [B, n], or [M]."""
        if not self.fp8_dims:
            self.plain[slots, index] = rows.to(self.dtype)
            return
        nope = rows[..., : self.fp8_dims].float().unflatten(-1, (-1, KV_FP8_BLOCK))
        amax = nope.abs().amax(-1, keepdim=True).clamp(min=FP8_AMAX_FLOOR)
        scale = ue8m0_scale(amax, FP8_E4M3_MAX)  # the kernels' rule: same grid as quant_sim
        self.codes[slots, index] = (nope / scale).to(torch.float8_e4m3fn).flatten(-2)
        self.exponents[slots, index] = (torch.frexp(scale)[1] - 1 + 127).squeeze(-1).to(
            torch.uint8)
        self.plain[slots, index] = rows[..., self.fp8_dims :].to(self.dtype)

    def read(self, slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows at (slots [B, 1], index [B, n]) -> [B, n, width] in the cache dtype."""
        plain = self.plain[slots, index]
        if not self.fp8_dims:
            return plain
        codes = self.codes[slots, index].float().unflatten(-1, (-1, KV_FP8_BLOCK))
        exponent = self.exponents[slots, index].int() - 127
        scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
        nope = (codes * scale.unsqueeze(-1)).flatten(-2)
        return torch.cat((nope.to(self.dtype), plain), dim=-1)

    def read_prefix(self, slots: torch.Tensor, n: int) -> torch.Tensor:
        """The first n rows of each slot: [B, n, width] (a view when nothing to convert and the
        slots are consecutive, the usual case)."""
        count = slots.shape[0]
        if not static_shapes() and not self.fp8_dims:
            first = int(slots[0, 0])
            consecutive = bool((slots[:, 0] == torch.arange(first, first + count,
                                                            device=slots.device)).all())
            if consecutive:
                return self.plain[first : first + count, :n]
        index = torch.arange(n, device=slots.device).expand(count, n)
        return self.read(slots, index)


class Ring:
    """Rows of the most recent positions of each slot, at `position % size`."""

    def __init__(self, slots: int, size: int, width: int, dtype, device, fp8_dims: int = 0):
        self.size = size
        self.store = RowStore(slots, size, width, dtype, device, fp8_dims)

    def read(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows at positions [B, n] (>= 0) of slots [B, 1] -> [B, n, width]."""
        return self.store.read(slots, positions % self.size)

    def write(self, slots: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Only the last `size` rows of a long chunk survive (positions [B, T] consecutive)."""
        keep = min(self.size, positions.shape[1])
        self.store.write(slots, positions[:, -keep:] % self.size, rows[:, -keep:])


# ---------------------------------------------------------------------------------------------
# One compressor's cache: rows ring + entries
# ---------------------------------------------------------------------------------------------


class CompressorCache:
    """Cache of one compressor (CSA main, CSA indexer or HCA): fp32 projected rows of the last
    positions and the compressed entries of every completed window."""

    def __init__(self, comp: Compressor, slots: int, capacity: int, slack: int, dtype, device,
                 fp8_dims: int = 0):
        self.ratio, self.overlap = comp.ratio, comp.overlap
        width = comp.wkv.out_features
        lookback = (2 if self.overlap else 1) * comp.ratio
        self.kv_rows = Ring(slots, lookback + slack, width, torch.float32, device)
        self.gate_rows = Ring(slots, lookback + slack, width, torch.float32, device)
        self.capacity = capacity // comp.ratio  # entries a query can see at most
        # A row for a trailing incomplete window too (capacity not a multiple of the ratio):
        # static-shape updates write the entry of the window being filled.
        rows = -(-capacity // comp.ratio)
        self.entries = RowStore(slots, rows, comp.head_dim, dtype, device, fp8_dims)

    def state_bytes(self) -> int:
        return self.kv_rows.store.nbytes() + self.gate_rows.store.nbytes()

    def update(self, comp: Compressor, slots, x, positions, inv_freq, post) -> None:
        """Project the new tokens, pool every window they complete, store the entries.

        x: [B, T, dim]; positions [B, T] consecutive from each slot's length; post: the
        entry numerics (FP8 or FP4 simulation) the full forward applies.
        """
        kv_new, gate_new = comp.project(x, positions)  # [B, T, width] fp32
        r = self.ratio
        start, length = positions[:, :1], positions.shape[1]
        first = start // r  # [B, 1] the window holding the first new token
        n_new = (start + length) // r - first  # windows completed by this chunk, per slot
        # Static shapes pool ceil(T / r) windows, the ones the chunk's tokens fall in, and
        # store them all: an incomplete window's entry is rewritten by the token completing
        # it, before any query can see it (and it stays inside the slot's rows).
        n_max = (length + r - 1) // r if static_shapes() else int(n_new.max())
        if n_max:
            kv_w, gate_w, prev_kv, prev_gate = self.window_rows(
                slots, kv_new, gate_new, start, first, n_max)
            pooled = compress_windows(kv_w, gate_w, r, self.overlap, prev_kv, prev_gate)
            index = first + torch.arange(n_max, device=x.device)  # [B, n]
            cos, sin = rope_cos_sin(inv_freq, index * r)
            entries = post(apply_rope(comp.normed(pooled, x.dtype), cos, sin))
            if static_shapes():
                self.entries.write(slots, index, entries)
            else:
                valid = torch.arange(n_max, device=x.device) < n_new  # slots complete fewer
                self.entries.write(slots.expand_as(index)[valid], index[valid], entries[valid])
        self.kv_rows.write(slots, positions, kv_new)
        self.gate_rows.write(slots, positions, gate_new)

    def window_rows(self, slots, kv_new, gate_new, start, first, n_max):
        """Rows of windows first..first+n_max-1 (and, overlapping, the window before) from the
        ring (positions before `start`) and the new rows. Returns compress_windows' inputs."""
        r, length = self.ratio, kv_new.shape[1]
        lead = r if self.overlap else 0
        pos = first * r - lead + torch.arange(n_max * r + lead, device=kv_new.device)  # [B, P]
        old = pos < start
        new_index = (pos - start).clamp(0, length - 1).unsqueeze(-1)
        ring_pos = pos.clamp(min=0)
        kv = torch.where(old.unsqueeze(-1), self.kv_rows.read(slots, ring_pos),
                         kv_new.gather(1, new_index.expand(-1, -1, kv_new.shape[-1])))
        gate = torch.where(old.unsqueeze(-1), self.gate_rows.read(slots, ring_pos),
                           gate_new.gather(1, new_index.expand(-1, -1, gate_new.shape[-1])))
        if not self.overlap:
            return kv, gate, None, None
        d = kv.shape[-1] // 2
        prev_kv, prev_gate = kv[:, :r, :d], gate[:, :r, :d]
        no_prev = (first == 0).unsqueeze(-1)  # [B, 1, 1]: window 0 has no previous window
        prev_kv = prev_kv.masked_fill(no_prev, 0.0)
        prev_gate = prev_gate.masked_fill(no_prev, float("-inf"))
        return kv[:, r:], gate[:, r:], prev_kv, prev_gate


# ---------------------------------------------------------------------------------------------
# One attention layer's cache and its attention core
# ---------------------------------------------------------------------------------------------


class LayerCache:
    """Window ring + (CSA/HCA) compressor caches of one attention layer."""

    def __init__(self, attn: Attention, slots: int, capacity: int, slack: int, dtype, device,
                 kv_fp8: bool = False):
        cfg = attn.cfg
        fp8_dims = cfg.nope_head_dim if kv_fp8 else 0
        self.ratio = attn.ratio
        # Opt-in observer of the Lightning Indexer (CSA layers), e.g. `dsv4 eval --suite niah`
        # checking that the top-k holds the needle: called as on_select(positions [B, T],
        # chosen [B, T, k] entry indices, -1 = padding) or chosen=None when every visible
        # entry is attended (no more of them than top-k). None (the default) costs nothing.
        self.on_select = None
        self.window = Ring(slots, attn.window + slack, attn.head_dim, dtype, device, fp8_dims)
        self.main = self.index = None
        if attn.compressor is not None:
            self.main = CompressorCache(attn.compressor, slots, capacity, slack, dtype, device,
                                        fp8_dims)
        if attn.indexer is not None:
            self.index = CompressorCache(attn.indexer.compressor, slots, capacity, slack, dtype,
                                         device)

    def kind(self) -> str:
        return {0: "sliding", 4: "csa", 128: "hca"}.get(self.ratio, f"ratio{self.ratio}")

    def attend(self, attn: Attention, x, q, kv, q_latent, positions, slots, cos, sin
               ) -> torch.Tensor:
        """The attention core of `Attention.forward` over the cache, for T new tokens per slot.

        x: [B, T, dim] normalized input; q [B, T, H, D], kv [B, T, D], q_latent: its
        projections; positions [B, T] = each slot's length + 0..T-1; slots [B, 1]. Stores the
        new window rows and compressed entries; returns the attention output [B, T, H, D].
        """
        window_keys, window_valid = recent_rows(self.window, slots, positions, kv, attn.window)
        self.window.write(slots, positions, kv)
        selection = None
        if self.main is not None:
            self.main.update(attn.compressor, slots, x, positions, attn.inv_freq,
                             attn.simulate_fp8)
            if self.index is not None:
                self.index.update(attn.indexer.compressor, slots, x, positions, attn.inv_freq,
                                  attn.indexer.simulate_fp4)
            selection = select_entries(attn, self, slots, x, q_latent, positions, cos, sin)
        return attend(q, window_keys, window_valid, attn.attn_sink, attn.window, selection)


def recent_rows(ring: Ring, slots, positions, new_rows, window: int):
    """The rows before the chunk that its window reaches (from the ring) followed by the
    chunk's rows.

    Returns (keys [B, L + T, D], valid [B, L + T]) with L = min(window, longest slot): key j
    holds position start - L + j, invalid when negative (short sequences skip the rows that
    would all be invalid).
    """
    start = positions[:, :1]
    lead = window if static_shapes() else min(window, int(start.max()))
    before = start - lead + torch.arange(lead, device=positions.device)  # [B, L]
    old = ring.read(slots, before.clamp(min=0)).to(new_rows.dtype)
    valid = torch.cat((before >= 0, torch.ones_like(positions, dtype=torch.bool)), dim=1)
    return torch.cat((old, new_rows), dim=1), valid


@dataclass
class Selection:
    """Compressed entries a chunk's queries attend.

    dense: values [B, C, D] with mask [B, T, C] (HCA; CSA with <= top-k visible entries);
    gathered: values [B, T, k, D] (each query's top-k) with mask [B, T, k].
    """

    values: torch.Tensor
    mask: torch.Tensor
    gathered: bool


def select_entries(attn: Attention, cache: LayerCache, slots, x, q_latent, positions, cos,
                   sin) -> Selection | None:
    ratio = attn.ratio
    n_visible = torch.div(positions + 1, ratio, rounding_mode="floor")  # [B, T]
    # How many entries to look at: the most any query sees, or all of them for static shapes.
    n_max = cache.main.capacity if static_shapes() else int(n_visible.max())
    if n_max == 0:
        return None
    entry = torch.arange(n_max, device=x.device)
    visible = entry < n_visible.unsqueeze(-1)  # [B, T, C]
    indexer = attn.indexer
    if indexer is None or n_max <= indexer.topk:
        if cache.on_select is not None and indexer is not None:
            cache.on_select(positions, None)
        return Selection(cache.main.entries.read_prefix(slots, n_max), visible, gathered=False)
    keys = cache.index.entries.read_prefix(slots, n_max)
    q_index = indexer.queries(q_latent, cos, sin)
    scores = indexer.scores(x, q_index, keys)  # [B, T, C]
    k = indexer.topk
    keep = top_k_mask(scores.masked_fill(~visible, float("-inf")), k)  # k per query
    # Their indices, ascending (what `nonzero` gives, without its data-dependent shape).
    chosen = torch.where(keep, entry, n_max).topk(k, dim=-1, largest=False).values
    mask = chosen < n_visible.unsqueeze(-1)  # fewer visible than k: the rest are padding
    if cache.on_select is not None:
        cache.on_select(positions, chosen.masked_fill(~mask, -1))
    values = cache.main.entries.read(slots, chosen.flatten(1))  # only the chosen rows
    return Selection(values.view(*chosen.shape, -1), mask, gathered=True)


def attend(q, keys, valid, sink, window: int, selection: Selection | None) -> torch.Tensor:
    """Window keys + selected compressed entries + sink in one fp32 softmax, a block of
    `window` queries at a time (each block sees 2*window keys at most).

    q: [B, T, H, D] scaled; keys: [B, L + T, D] and valid [B, L + T] from `recent_rows`
    (L <= window rows before the chunk).
    """
    length = q.shape[1]
    lead = keys.shape[1] - length
    outs = []
    for s in range(0, length, window):
        e = min(s + window, length)
        first = s + lead - window  # the key of position (query s) - window, if it were kept
        lo = max(0, first)
        outs.append(attend_block(q[:, s:e], keys[:, lo : e + lead], valid[:, lo : e + lead],
                                 sink, window, selection, s, e, skipped=lo - first))
    return torch.cat(outs, dim=1)


def attend_block(q, keys, valid, sink, window, selection, s, e, skipped=0):
    """Queries s..e-1 of the chunk; keys hold positions from (query s) - window + skipped on."""
    batch, n, heads, _ = q.shape
    keys = keys.to(q.dtype)
    i = torch.arange(n, device=q.device).view(n, 1)
    j = skipped + torch.arange(keys.shape[1], device=q.device).view(1, -1)
    in_window = (j > i) & (j <= i + window)  # [n, K]
    allowed = in_window.unsqueeze(0) & valid.unsqueeze(1)  # [B, n, K]
    scores = torch.einsum("bqhd,bkd->bhqk", q, keys).float()
    parts = [scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))]
    values = None
    if selection is not None:
        values = selection.values.to(q.dtype)
        mask = selection.mask[:, s:e]
        if selection.gathered:
            values = values[:, s:e]
            entry_scores = torch.einsum("bqhd,bqkd->bhqk", q, values).float()
        else:
            entry_scores = torch.einsum("bqhd,bcd->bhqc", q, values).float()
        parts.append(entry_scores.masked_fill(~mask.unsqueeze(1), float("-inf")))
    parts.append(sink.float().view(1, heads, 1, 1).expand(batch, heads, n, 1))
    probs = torch.cat(parts, dim=-1).softmax(dim=-1).to(q.dtype)
    n_keys = keys.shape[1]
    out = torch.einsum("bhqk,bkd->bqhd", probs[..., :n_keys], keys)
    if values is not None:
        p_entries = probs[..., n_keys:-1]
        if selection.gathered:
            out = out + torch.einsum("bhqk,bqkd->bqhd", p_entries, values)
        else:
            out = out + torch.einsum("bhqc,bcd->bqhd", p_entries, values)
    return out


# ---------------------------------------------------------------------------------------------
# The whole model's cache
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Caches of every attention layer (and of the MTP block, for speculation) for `slots`
    sequences of up to `capacity` tokens each. `lengths[slot]` counts the tokens processed by
    the main layers; `mtp_lengths[slot]` those processed by the MTP block."""

    def __init__(self, model, slots: int, capacity: int, *, dtype=None, device=None,
                 slack: int = DEFAULT_SLACK, kv_fp8: bool = False, mtp: bool = False):
        cfg: ModelConfig = model.cfg
        if capacity < 1 or capacity > cfg.max_seq_len:
            raise CacheError(f"capacity={capacity}: must be between 1 and the model's "
                             f"max_seq_len {cfg.max_seq_len}")
        if slots < 1:
            raise CacheError(f"slots={slots}: must be at least 1")
        if kv_fp8 and cfg.nope_head_dim % KV_FP8_BLOCK:
            raise CacheError(f"kv_fp8 needs head_dim - rope_head_dim divisible by {KV_FP8_BLOCK}, "
                             f"got {cfg.nope_head_dim}")
        param = model.embed.weight  # the activations' dtype (mHC, sinks, head may stay fp32)
        dtype = dtype or param.dtype
        device = device or param.device
        self.capacity, self.slots, self.slack = capacity, slots, slack

        def make(attn: Attention) -> LayerCache:
            return LayerCache(attn, slots, capacity, slack, dtype, device, kv_fp8)

        self.layers = [make(layer.attn) for layer in model.layers]
        self.mtp = [make(block.attn) for block in model.mtp] if mtp else []
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.mtp_lengths = torch.zeros(slots, dtype=torch.long, device=device)
        # Furthest position each slot ever wrote since its reset: bounds how far back the
        # rings still hold the rows a truncation needs.
        self.high_water = torch.zeros(slots, dtype=torch.long, device=device)

    # -- bookkeeping ------------------------------------------------------------------------
    def reserve(self, slots: torch.Tensor, n_new: int, mtp: bool = False) -> torch.Tensor:
        """Positions [B, n_new] for the next tokens of `slots` [B]; checks the capacity."""
        start = (self.mtp_lengths if mtp else self.lengths)[slots]
        # Compiled decode checks no tensor values (the engine checks each request's room).
        if not static_shapes() and int(start.max()) + n_new > self.capacity:
            worst = int(slots[start.argmax()])
            raise CacheError(f"slot {worst}: {int(start.max())} + {n_new} tokens exceed the cache "
                             f"capacity of {self.capacity} tokens")
        return start.unsqueeze(1) + torch.arange(n_new, device=start.device)

    def advance(self, slots: torch.Tensor, n_new: int, mtp: bool = False) -> None:
        if mtp:
            self.mtp_lengths[slots] += n_new
            return
        self.lengths[slots] += n_new
        self.high_water[slots] = torch.maximum(self.high_water[slots], self.lengths[slots])

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything of `slot` from token `length` on (main layers and MTP block)."""
        current = int(self.lengths[slot])
        if not 0 <= length <= current:
            raise CacheError(f"slot {slot}: cannot truncate to {length}, it holds {current} "
                             "tokens")
        furthest = int(self.high_water[slot])
        if length < furthest - self.slack and length > 0:
            raise CacheError(
                f"slot {slot}: truncating to {length} needs rows overwritten since (it reached "
                f"{furthest} tokens; the cache keeps {self.slack} tokens of slack); re-prefill")
        if length == 0:
            self.reset(slot)
            return
        self.lengths[slot] = length
        self.mtp_lengths[slot] = min(int(self.mtp_lengths[slot]), length)

    def copy_slot(self, src: int, dst: int) -> None:
        """Make slot `dst` a copy of slot `src` (a shared prompt sampled several ways)."""
        for store in self.stores():
            for t in store.tensors():
                t[dst] = t[src]
        for counter in (self.lengths, self.mtp_lengths, self.high_water):
            counter[dst] = counter[src]

    def stores(self) -> list[RowStore]:
        out = []
        for cache in self.layers + self.mtp:
            out.append(cache.window.store)
            for comp in (cache.main, cache.index):
                if comp is not None:
                    out += [comp.entries, comp.kv_rows.store, comp.gate_rows.store]
        return out

    def reset(self, slot: int) -> None:
        """Free a slot for a new sequence (its rows are overwritten before being read)."""
        self.lengths[slot] = 0
        self.mtp_lengths[slot] = 0
        self.high_water[slot] = 0

    # -- memory ----------------------------------------------------------------------------
    def bytes_by_kind(self) -> dict[str, int]:
        """Allocated bytes (all slots, full capacity) by layer type and part."""
        out: dict[str, int] = {}

        def add(key: str, n: int) -> None:
            out[key] = out.get(key, 0) + n

        for cache in self.layers + self.mtp:
            prefix = "mtp_" if cache in self.mtp else ""
            add(f"{prefix}window", cache.window.store.nbytes())
            if cache.main is not None:
                add(f"{prefix}{cache.kind()}_entries", cache.main.entries.nbytes())
                add(f"{prefix}compressor_state", cache.main.state_bytes())
            if cache.index is not None:
                add(f"{prefix}csa_indexer_keys", cache.index.entries.nbytes())
                add(f"{prefix}compressor_state", cache.index.state_bytes())
        out["total"] = sum(out.values())
        return out

    def used_bytes(self, slot: int, include_state: bool = False) -> int:
        """Bytes that slot's `length` tokens occupy in the main layers: the full window ring
        (without slack), one entry per completed window."""
        length = int(self.lengths[slot])
        total = 0
        for cache in self.layers:
            ring_rows = cache.window.size - self.slack
            total += ring_rows * cache.window.store.row_bytes()
            for comp in (cache.main, cache.index):
                if comp is not None:
                    total += (length // comp.ratio) * comp.entries.row_bytes()
                    if include_state:
                        total += comp.state_bytes() // self.slots
        return total
