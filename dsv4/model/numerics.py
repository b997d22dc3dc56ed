"""The numerics of the official kernels in plain PyTorch: FP8 / FP4 round trips, Hadamard rotation.

The official inference code runs these as TileLang / CUDA kernels (`act_quant`, `fp4_act_quant`,
`rotate_activation`). Here they are plain torch, work on any float dtype on CPU and CUDA, and
return the input dtype:

* `fp8_e4m3_roundtrip`: window / compressed KV, first 448 dims, blocks of 64, UE8M0 scale.
* `fp4_e2m1_roundtrip`: indexer q and keys after the Hadamard rotation, blocks of 32, E8M0 scale.
* `hadamard_transform`: normalized Walsh-Hadamard rotation (n^-1/2), O(n log n) butterfly.

Gradients of the round trips are straight-through (identity) with the block scale treated as a
constant, the usual QAT convention, so a model can train through the simulation.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
FP4_E2M1_MAX = 6.0  # largest E2M1 value
# Official `act_quant` floors each block's amax at 1e-4 before computing the scale.
FP8_AMAX_FLOOR = 1e-4
# Official `fp4_act_quant` (E8M0-scale branch, the indexer's) floors amax at 6 * 2^-126 so that
# amax / 6 stays a normal fp32 number; it does NOT use act_quant's 1e-4. We follow the official
# kernel: an all-tiny block keeps its relative precision instead of collapsing to zero.
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

# Magnitudes of the eight E2M1 codes 0..7 (bit 3 of a nibble is the sign), the OCP MX E2M1 grid.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_values(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 E2M1 values indexed by 4-bit code (codes 8..15 are the negatives of 0..7), fp32."""
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes])


def ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two >= amax / qmax (an E8M0 / UE8M0 scale), computed exactly in fp32.

    Multiplying by the fp32 constant 1/qmax (rather than dividing) mirrors the official kernels;
    for qmax in {448, 6} it gives the same result at exact powers of two. `frexp` instead of
    log2/ceil keeps exact powers of two exact: r = m * 2^e with m in [0.5, 1), so
    ceil(log2 r) = e - 1 when m == 0.5 and e otherwise. amax must be positive and finite.
    """
    ratio = amax.float() * torch.tensor(1.0 / qmax, dtype=torch.float32, device=amax.device)
    mantissa, exponent = torch.frexp(ratio)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(ratio), exponent)


def round_to_e2m1(q: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to the E2M1 grid, saturating at ±6.

    Round to nearest, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    2.5 -> 2, 3.5 -> 4, 5 -> 4), as a hardware cvt to e2m1 does. On each binade the grid is
    evenly spaced (step 0.5 below 2, 1 below 4, 2 up to 6) and an even multiple of the step is
    exactly an even code, so torch.round's half-to-even on |q| / step gives the right ties.
    """
    magnitude = q.abs().clamp(max=FP4_E2M1_MAX)
    step = torch.full_like(magnitude, 2.0)
    step = torch.where(magnitude < 4.0, 1.0, step)
    step = torch.where(magnitude < 2.0, 0.5, step)
    return torch.copysign(torch.round(magnitude / step) * step, q)


def _check_blocks(name: str, x: torch.Tensor, block: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if block <= 0:
        raise ValueError(f"{name}: block size must be positive, got {block}")
    if x.dim() == 0 or x.shape[-1] % block != 0:
        size = x.shape[-1] if x.dim() else "none (0-d tensor)"
        raise ValueError(
            f"{name}: last dimension {size} of tensor with shape {tuple(x.shape)} "
            f"is not divisible by block size {block}"
        )


def _block_scales(blocks: torch.Tensor, qmax: float, amax_floor: float) -> torch.Tensor:
    """Per-block power-of-two scales for blocks [..., n_blocks, block] -> [..., n_blocks, 1]."""
    with torch.no_grad():  # the scale is a constant for the gradient (straight-through)
        amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=amax_floor)
        return ue8m0_scale(amax, qmax)


def fp8_e4m3_roundtrip(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """FP8-E4M3 quantize -> dequantize along the last dim, one UE8M0 scale per `block` elements.

    Matches the official `act_quant(..., scale_fmt="ue8m0", inplace=True)`: amax floored at 1e-4,
    scale = 2^ceil(log2(amax / 448)), values / scale clamped to ±448, cast to float8_e4m3fn (round
    to nearest even, subnormals down to 2^-9) and multiplied back. Computed in fp32; returns
    x.dtype. A half-precision result can round again if scale * 2^-9 is below the dtype's range.
    """
    _check_blocks("fp8_e4m3_roundtrip", x, block)
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)  # [..., nb, block]
    scale = _block_scales(blocks, FP8_E4M3_MAX, FP8_AMAX_FLOOR)
    q = (blocks / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    # The clamp matters: on CUDA the cast maps values past 464 to NaN (CPU saturates to 448).
    # Straight-through via detach, not through the cast, whose backward would round the
    # gradient to float8 too. q + (r - q) == r exactly (see fp4_e2m1_roundtrip).
    q = q + (q.to(torch.float8_e4m3fn).float() - q).detach()
    return (q * scale).reshape(x.shape).to(x.dtype)


def fp4_e2m1_roundtrip(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4-E2M1 quantize -> dequantize along the last dim, one E8M0 scale per `block` elements.

    Matches the official `fp4_act_quant(..., inplace=True)` with E8M0 scales (the indexer path):
    amax floored at 6 * 2^-126 (see FP4_AMAX_FLOOR), scale = 2^ceil(log2(amax / 6)), values /
    scale rounded to the E2M1 grid with ties to even (`round_to_e2m1`) and multiplied back.
    Plain fp32 arithmetic, no torch float4 dtype (those lack ops on CPU). Returns x.dtype.
    """
    _check_blocks("fp4_e2m1_roundtrip", x, block)
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)  # [..., nb, block]
    scale = _block_scales(blocks, FP4_E2M1_MAX, FP4_AMAX_FLOOR)
    q = blocks / scale
    # Straight-through rounding. q + (r - q) == r exactly: |r - q| <= |q| (0 is on the grid) and
    # r - q is a multiple of ulp(q), so both steps are exact and the output is on the grid.
    q = q + (round_to_e2m1(q) - q).detach()
    return (q * scale).reshape(x.shape).to(x.dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform along the last dim: x @ H_n * n^-1/2.

    H_n is the Sylvester (natural-order) Hadamard matrix, H_2n = [[H_n, H_n], [H_n, -H_n]], the
    one `fast_hadamard_transform` uses. The normalized transform is orthogonal and symmetric,
    hence its own inverse. n must be a power of two. Computed in fp32 (fp64 for fp64 input) with
    log2(n) butterfly passes; returns x.dtype.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform: expected a floating-point tensor, got {x.dtype}")
    n = x.shape[-1] if x.dim() else 0
    if n < 1 or n & (n - 1):
        raise ValueError(
            f"hadamard_transform: last dimension {n} of tensor with shape {tuple(x.shape)} "
            "is not a power of two"
        )
    lead = x.shape[:-1]
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, n)
    half = 1
    while half < n:
        # Pair element i with i + half inside each group of 2*half: [rows, groups, 2, half].
        pairs = y.reshape(-1, n // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
        half *= 2
    return (y * n**-0.5).reshape(*lead, n).to(x.dtype)
