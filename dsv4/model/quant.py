"""The weight formats of the released checkpoints (their `quantization_config`, V4 report: FP4 QAT).

* FP8 E4M3 with one E8M0 (power-of-two) scale per 128 x 128 block: attention projections,
  indexer `wq_b`, shared experts, MTP `e_proj/h_proj`. Weight `[out, in]` float8_e4m3fn, scale
  `[ceil(out/128), ceil(in/128)]`; edge blocks are partial (odd shapes need no padding on disk).
* FP4 E2M1 with one E8M0 scale per 1 x 32 block along the input dim: routed experts. Two codes
  per byte, **low nibble = even (first) element**; stored as int8 `[out, ceil(in/2)]`, scale
  `[out, ceil(in/32)]`. An odd `in` leaves the last high nibble 0.
* E8M0: an unsigned biased exponent, value 2^(code - 127); code 255 is NaN. Stored as
  torch.float8_e8m0fnu (safetensors `F8_E8M0`).

Dequantization multiplies by the scale (`weight * scale`), as the official code does. Also
here: the lossless FP4 -> FP8 recast and the modules that keep FP8/FP4 weights in memory and
dequantize on the fly (`FP8Linear`, `FP4Experts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model.numerics import FP4_E2M1_MAX, FP8_E4M3_MAX, e2m1_values, round_to_e2m1, ue8m0_scale

WEIGHT_FP8_BLOCK = 128  # FP8 weights: one scale per 128 x 128 block (the KV cache's are 64 wide)
FP4_BLOCK = 32  # 1 x FP4_BLOCK along the input dim
E8M0_BIAS = 127
# Smallest scale we emit is 2^-126 (a normal fp32): an all-zero block still gets a valid scale.
_MIN_SCALE_EXP = -126


# ---- E8M0 scales -------------------------------------------------------------------------
def e8m0_from_pow2(scale: torch.Tensor) -> torch.Tensor:
    """fp32 powers of two -> float8_e8m0fnu, exactly (code = exponent + 127)."""
    mantissa, exponent = torch.frexp(scale.float())
    if not bool((mantissa == 0.5).all()):
        raise ValueError("E8M0 scales must be positive powers of two")
    code = exponent.to(torch.int32) - 1 + E8M0_BIAS  # 2^k = 0.5 * 2^(k+1)
    if bool((code < 0).any()) or bool((code > 254).any()):
        raise ValueError("scale outside the E8M0 range 2^-127 .. 2^127")
    return code.to(torch.uint8).view(torch.float8_e8m0fnu)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A block scale as fp32: E8M0 decoded exactly (2^(code-127), 255 -> NaN), else upcast.

    Plain fp32 scales occur in checkpoints written with `scale_fmt: null` (DeepSeek-V3 style).
    """
    if scale.dtype == torch.float8_e8m0fnu:
        code = scale.view(torch.uint8).to(torch.int32)
        value = torch.ldexp(torch.ones(code.shape, device=code.device), code - E8M0_BIAS)
        return torch.where(code == 255, torch.nan, value)
    return scale.float()


def _pow2_scales(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax, at least 2^-126 (fp32)."""
    floor = qmax * 2.0**_MIN_SCALE_EXP
    return ue8m0_scale(amax.float().clamp(min=floor), qmax)


# ---- FP8 E4M3, 128 x 128 blocks ------------------------------------------------------------
def _blocked(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad the last two dims to multiples of `block`: [..., R, C] -> [..., rb, block, cb,
    block], plus the original R, C."""
    rows, cols = x.shape[-2:]
    pad_r, pad_c = -rows % block, -cols % block
    padded = F.pad(x, (0, pad_c, 0, pad_r))
    rb, cb = padded.shape[-2] // block, padded.shape[-1] // block
    return padded.reshape(*x.shape[:-2], rb, block, cb, block), rows, cols


def _unblocked(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    *lead, rb, block, cb, _ = blocks.shape
    return blocks.reshape(*lead, rb * block, cb * block)[..., :rows, :cols]


def quantize_fp8(weight: torch.Tensor,
                 block: int = WEIGHT_FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] float -> (float8_e4m3fn [..., out, in], E8M0 [..., ceil(out/b),
    ceil(in/b)]).

    Per block: scale = 2^ceil(log2(amax / 448)) (no value saturates), q = RNE(w / scale).
    Zero padding of edge blocks does not change their amax.
    """
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_fp8: expected a float matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    blocks, rows, cols = _blocked(weight.float(), block)  # [..., rb, b, cb, b]
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)  # [..., rb, 1, cb, 1]
    scale = _pow2_scales(amax, FP8_E4M3_MAX)
    q = (blocks / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return _unblocked(q, rows, cols), e8m0_from_pow2(scale[..., :, 0, :, 0])


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block: int = WEIGHT_FP8_BLOCK) -> torch.Tensor:
    """(float8_e4m3fn [..., out, in], scale [..., ceil(out/b), ceil(in/b)]) -> dtype."""
    rows, cols = weight.shape[-2:]
    expected = (*weight.shape[:-2], -(-rows // block), -(-cols // block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} needs a scale of shape {expected} "
                         f"({block}x{block} blocks), got {tuple(scale.shape)}")
    s = scale_to_float(scale)
    s = s.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :rows, :cols]
    return (weight.float() * s).to(dtype)


# ---- FP4 E2M1, 1 x 32 blocks, two codes per byte -------------------------------------------
def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """fp32 values already on the E2M1 grid -> 4-bit codes (uint8): sign bit 3, magnitude index
    0..7 for 0, 0.5, 1, 1.5, 2, 3, 4, 6. -0.0 gets code 8 (the sign is kept)."""
    magnitude = q.abs()
    index = torch.where(magnitude < 2.0, magnitude * 2.0,  # 0, .5, 1, 1.5 -> 0..3
                        torch.where(magnitude < 4.0, magnitude + 2.0,  # 2, 3 -> 4, 5
                                    magnitude / 2.0 + 4.0))  # 4, 6 -> 6, 7
    sign = torch.signbit(q).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] -> int8 [..., ceil(n/2)]; element 2i in the low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int8 [..., ceil(n/2)] -> uint8 codes [..., n] (inverse of `pack_fp4`)."""
    if packed.shape[-1] != -(-n // 2):
        raise ValueError(f"packed FP4 row of {packed.shape[-1]} bytes cannot hold {n} values")
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(*b.shape[:-1], -1)
    return codes[..., :n]


def quantize_fp4(weight: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (packed int8 [..., out, ceil(in/2)], E8M0 [..., out,
    ceil(in/block)]).

    Per 1 x block: scale = 2^ceil(log2(amax / 6)), values rounded to the E2M1 grid, ties to
    the even code (`numerics.round_to_e2m1`). A partial last block is padded with zeros.
    """
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_fp4: expected a float matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n = weight.shape[-1]
    padded = F.pad(weight.float(), (0, -n % block))
    blocks = padded.reshape(*weight.shape[:-1], -1, block)  # [..., out, nb, block]
    scale = _pow2_scales(blocks.abs().amax(dim=-1, keepdim=True), FP4_E2M1_MAX)
    codes = e2m1_codes(round_to_e2m1(blocks / scale)).reshape(*weight.shape[:-1], -1)[..., :n]
    return pack_fp4(codes), e8m0_from_pow2(scale[..., 0])


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                   dtype: torch.dtype = torch.float32, block: int = FP4_BLOCK) -> torch.Tensor:
    """(int8 [..., out, ceil(in/2)], scale [..., out, ceil(in/block)]) -> dtype [..., out, in]."""
    expected = (*packed.shape[:-1], -(-in_features // block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP4 weight {tuple(packed.shape)} with {in_features} inputs needs a "
                         f"scale of shape {expected} (1x{block} blocks), got "
                         f"{tuple(scale.shape)}")
    values = e2m1_values(packed.device)[unpack_fp4(packed, in_features).long()]  # [..., out, in]
    s = scale_to_float(scale).repeat_interleave(block, dim=-1)[..., :in_features]
    return (values * s).to(dtype)


# ---- the lossless FP4 -> FP8 recast (V4 report: FP4 QAT) ------------------------------------
# An E2M1 value has at most two significant bits (1.5 = 1.1b), E4M3 has four, so
# c * s is exact in FP8 units of S = max(s) / 64 as long as it does not fall below FP8's
# subnormal step 2^-9: 6 * 64 = 384 <= 448 (no saturation) and 0.5 * 2^(6-d) >= 2^-9 for every
# sub-block whose scale is d binades below the block's largest, i.e. d <= 14. The recast
# checks its own result and refuses (rather than silently rounding) when a block is wider.
_FP4_TO_FP8_HEADROOM = 64.0


def fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor, in_features: int,
               block: int = WEIGHT_FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 (1x32 scales) -> FP8 E4M3 (128x128 E8M0 scales), losslessly; [..., out, in]."""
    exact = dequantize_fp4(packed, scale, in_features)  # fp32, exact
    blocks, rows, cols = _blocked(exact, block)
    # Largest 1x32 scale per 128x128 block, from the scales themselves (an all-zero sub-block
    # may carry any scale, so take it only where the sub-block has a non-zero value).
    sub = scale_to_float(scale).repeat_interleave(FP4_BLOCK, dim=-1)[..., :in_features]
    sub = torch.where(exact != 0, sub, torch.zeros_like(sub))
    sub_blocks, _, _ = _blocked(sub, block)
    smax = sub_blocks.amax(dim=(-3, -1), keepdim=True)
    big = (smax / _FP4_TO_FP8_HEADROOM).clamp(min=2.0**_MIN_SCALE_EXP)
    q = (blocks / big).to(torch.float8_e4m3fn)
    if not torch.equal(q.float() * big, blocks):
        raise ValueError("FP4 -> FP8 recast would round: within one 128x128 block the 1x32 "
                         "scales span more than 2^14")
    return _unblocked(q, rows, cols), e8m0_from_pow2(big[..., :, 0, :, 0])


# ---- modules that keep quantized weights and dequantize in the matmul ------------------------
class FP8Linear(nn.Module):
    """A bias-free linear layer holding an FP8 weight [out, in] and its 128x128 block scales.

    forward dequantizes the weight to the input's dtype on each call (memory: the FP8 bytes
    plus one transient dequantized copy), so the numbers equal those of the dequantized model.
    `weight` (a property) is the dequantized matrix in `dtype`, for code that reads it directly
    (the grouped output projection reads `wo_a.weight`).
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, quant_sim: bool = False,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.quant_sim = quant_sim
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.qweight, self.scale, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_sim:
            from dsv4.model.network import act_quant

            x = act_quant(x)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


class QuantizedExperts(nn.Module):
    """Stacked routed-expert weights [E, out, in] kept in FP4 (or FP8) form.

    Indexing gives one expert's dequantized fp32 matrix, so it stands in for the stacked
    parameter `RoutedExperts.w1/w2/w3`, whose forward reads `w[e]` and `w.shape[0]`.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int, int],
                 kind: str):
        super().__init__()
        if kind not in ("fp4", "fp8"):
            raise ValueError(f"kind={kind!r}: must be 'fp4' or 'fp8'")
        self.kind = kind
        self.full_shape = torch.Size(shape)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @property
    def shape(self) -> torch.Size:
        return self.full_shape

    def __len__(self) -> int:
        return self.full_shape[0]

    def __getitem__(self, expert: int) -> torch.Tensor:
        if self.kind == "fp4":
            return dequantize_fp4(self.weight[expert], self.scale[expert], self.full_shape[2])
        return dequantize_fp8(self.weight[expert], self.scale[expert])

    def extra_repr(self) -> str:
        return f"shape={tuple(self.full_shape)}, {self.kind}"
