"""FP8 E4M3 / FP4 E2M1 weight formats with E8M0 scales, bit-exact against table-driven
references written from the format definitions (not from torch's casts)."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.model.quant import (
    FP8Linear,
    QuantizedExperts,
    dequantize_fp4,
    dequantize_fp8,
    e8m0_from_pow2,
    fp4_to_fp8,
    pack_fp4,
    quantize_fp4,
    quantize_fp8,
    scale_to_float,
    unpack_fp4,
)


# ---- table-driven references ---------------------------------------------------------------
def e4m3_value(code: int) -> float:
    """Value of an FP8 E4M3 (fn) code: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
    infinities, S.1111.111 is NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


E4M3_MAGNITUDES = torch.tensor([e4m3_value(c) for c in range(0x7F)], dtype=torch.float64)
E2M1_MAGNITUDES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)


def nearest_code(x: torch.Tensor, magnitudes: torch.Tensor, sign_bit: int) -> torch.Tensor:
    """Round-to-nearest, ties to the even code, on magnitudes; the sign bit copied from x."""
    dist = (x.abs().double().reshape(-1, 1) - magnitudes).abs()  # [N, codes]
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    codes = torch.arange(len(magnitudes))
    even = tied & (codes % 2 == 0)
    pick = torch.where(even.any(dim=1), even.int().argmax(dim=1), tied.int().argmax(dim=1))
    return (pick | (torch.signbit(x.reshape(-1)).long() * sign_bit)).reshape(x.shape)


def pow2_scale(amax: float, qmax: float) -> float:
    """Smallest power of two s with amax / s <= qmax (floored at 2^-126), exactly."""
    amax = max(amax, qmax * 2.0**-126)
    e = math.ceil(math.log2(amax / qmax))
    # log2 of an exact power-of-two ratio is exact; guard the neighbours anyway.
    while amax / 2.0 ** (e - 1) <= qmax:
        e -= 1
    while amax / 2.0**e > qmax:
        e += 1
    return 2.0**e


def reference_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [out, in], E8M0 codes [ceil(out/b), ceil(in/b)]), block by block."""
    out, inp = w.shape
    codes = torch.zeros(out, inp, dtype=torch.long)
    scales = torch.zeros(-(-out // block), -(-inp // block), dtype=torch.long)
    for bi in range(scales.shape[0]):
        for bj in range(scales.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            blk = w[rows, cols].double()
            s = pow2_scale(blk.abs().max().item(), 448.0)
            scales[bi, bj] = round(math.log2(s)) + 127
            codes[rows, cols] = nearest_code(blk / s, E4M3_MAGNITUDES, 0x80)
    return codes.to(torch.uint8), scales.to(torch.uint8)


def reference_fp4(w: torch.Tensor, block: int = 32) -> tuple[list[list[int]], torch.Tensor]:
    """(packed bytes per row, E8M0 codes [out, ceil(in/32)]); low nibble = even element."""
    out, inp = w.shape
    scales = torch.zeros(out, -(-inp // block), dtype=torch.long)
    codes = torch.zeros(out, inp, dtype=torch.long)
    for j in range(scales.shape[1]):
        cols = slice(j * block, (j + 1) * block)
        blk = w[:, cols].double()  # [out, <=32]: one scale per row
        s = torch.tensor([pow2_scale(a, 6.0) for a in blk.abs().amax(dim=1).tolist()],
                         dtype=torch.float64)
        scales[:, j] = torch.tensor([round(math.log2(v)) + 127 for v in s.tolist()])
        codes[:, cols] = nearest_code(blk / s[:, None], E2M1_MAGNITUDES, 0x8)
    packed = []
    for i in range(out):
        row = codes[i].tolist() + ([0] if inp % 2 else [])
        packed.append([row[k] | (row[k + 1] << 4) for k in range(0, len(row), 2)])
    return packed, scales.to(torch.uint8)


def test_e4m3_table_matches_the_format() -> None:
    assert e4m3_value(0x7E) == 448.0 and e4m3_value(0x01) == 2.0**-9
    assert e4m3_value(0x38) == 1.0 and math.isnan(e4m3_value(0x7F))
    # torch agrees with the table on every finite code.
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).double()
    table = torch.tensor([e4m3_value(c) for c in range(256)], dtype=torch.float64)
    assert torch.equal(values.nan_to_num(7.0), table.nan_to_num(7.0))


# ---- weights with every kind of value --------------------------------------------------------
def varied_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    """Random weights whose magnitude changes by up to 2^20 between rows / column groups,
    with exact zeros, negative zeros and an all-zero block row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    w *= 2.0 ** torch.randint(-10, 10, (out, 1), generator=gen).float()
    w *= 2.0 ** torch.randint(-4, 4, (1, inp), generator=gen).float()
    w[0, : min(5, inp)] = 0.0
    if inp > 6:
        w[0, 6] = -0.0
    w[-1] = 0.0
    return w


SHAPES = [(1, 1), (3, 5), (128, 128), (130, 259), (257, 33)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_is_bit_exact_to_the_reference(shape: tuple[int, int]) -> None:
    w = varied_weight(*shape, seed=sum(shape))
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert q.shape == w.shape and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    ref_q, ref_s = reference_fp8(w)
    assert torch.equal(q.view(torch.uint8), ref_q)
    assert torch.equal(s.view(torch.uint8), ref_s)
    # Dequantization: table value times 2^(code - 127).
    deq = dequantize_fp8(q, s, torch.float64)
    table = torch.tensor([e4m3_value(c) for c in range(256)], dtype=torch.float64)
    expand = ref_s.long().repeat_interleave(128, 0).repeat_interleave(128, 1)
    expected = table[ref_q.long()] * 2.0 ** (expand[: shape[0], : shape[1]] - 127).double()
    assert torch.equal(deq, expected)


def test_fp8_ties_round_to_even_and_scale_bias() -> None:
    w = torch.zeros(128, 128)
    w[0, 0] = 448.0  # amax 448 -> scale exactly 1 -> E8M0 code 127
    w[0, 1] = 1.0625  # halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1) -> 1.0
    w[0, 2] = 1.1875  # halfway between 1.125 and 1.25 -> 1.25 (even mantissa)
    w[0, 3] = -3 * 2.0**-10  # halfway between subnormals 1 and 2 (x 2^-9) -> 2 * 2^-9
    q, s = quantize_fp8(w)
    assert s.view(torch.uint8).item() == 127
    assert q[0, :4].float().tolist() == [448.0, 1.0, 1.25, -(2.0**-8)]
    w[0, 0] = 449.0  # just above 448 -> scale 2 -> code 128
    assert quantize_fp8(w)[1].view(torch.uint8).item() == 128


@pytest.mark.parametrize("shape", SHAPES)
def test_fp4_is_bit_exact_to_the_reference(shape: tuple[int, int]) -> None:
    w = varied_weight(*shape, seed=7 + sum(shape))
    packed, s = quantize_fp4(w)
    assert packed.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu
    assert packed.shape == (shape[0], -(-shape[1] // 2))
    assert s.shape == (shape[0], -(-shape[1] // 32))
    ref_packed, ref_s = reference_fp4(w)
    assert packed.view(torch.uint8).tolist() == ref_packed
    assert torch.equal(s.view(torch.uint8), ref_s)
    deq = dequantize_fp4(packed, s, shape[1], torch.float64)
    codes = unpack_fp4(packed, shape[1]).long()
    table = torch.cat([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])
    expand = ref_s.long().repeat_interleave(32, 1)[:, : shape[1]]
    assert torch.equal(deq, table[codes] * 2.0 ** (expand - 127).double())


def test_fp4_nibble_order_sign_and_ties() -> None:
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([1.0, -0.5, 6.0, 0.25, 0.75, 2.5])
    packed, s = quantize_fp4(w)  # amax 6 -> scale 1 -> code 127
    assert s.view(torch.uint8).item() == 127
    b = packed.view(torch.uint8)[0].tolist()
    # 1.0 = code 2 (low nibble), -0.5 = sign | 1 = 9 (high nibble) -> 0x92
    assert b[0] == 0x92
    # 6.0 = code 7 low, 0.25 ties to 0 (code 0, even) high -> 0x07
    assert b[1] == 0x07
    # 0.75 ties to 1.0 (code 2, even; not 0.5 = code 1), 2.5 ties to 2.0 (code 4) -> 0x42
    assert b[2] == 0x42
    assert packed.dtype == torch.int8 and packed[0, 0].item() == 0x92 - 256


def test_pack_unpack_odd_length() -> None:
    codes = torch.tensor([[1, 2, 3, 15, 8]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.view(torch.uint8).tolist() == [[0x21, 0xF3, 0x08]]
    assert torch.equal(unpack_fp4(packed, 5), codes)
    with pytest.raises(ValueError, match="cannot hold 7"):
        unpack_fp4(packed, 7)


def test_e8m0_codes_and_nan() -> None:
    scales = torch.tensor([2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127])
    assert e8m0_from_pow2(scales).view(torch.uint8).tolist() == [0, 1, 126, 127, 128, 254]
    decoded = scale_to_float(torch.tensor([0, 127, 254, 255], dtype=torch.uint8)
                             .view(torch.float8_e8m0fnu))
    assert decoded[:3].tolist() == [2.0**-127, 1.0, 2.0**127] and math.isnan(decoded[3])
    with pytest.raises(ValueError, match="powers of two"):
        e8m0_from_pow2(torch.tensor([3.0]))


def test_bad_scale_shapes_are_named() -> None:
    q, s = quantize_fp8(torch.randn(130, 100))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        dequantize_fp8(q, s[:1])
    p, s4 = quantize_fp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        dequantize_fp4(p, s4[:, :1], 64)


def test_stacked_experts_quantize_like_each_expert() -> None:
    w = torch.randn(3, 40, 70)
    packed, s = quantize_fp4(w)
    for e in range(3):
        pe, se = quantize_fp4(w[e])
        assert torch.equal(packed[e], pe) and torch.equal(s[e].view(torch.uint8),
                                                          se.view(torch.uint8))


def test_fp4_to_fp8_is_lossless() -> None:
    # Row magnitudes within 2^12 of each other, so each 128x128 block's 1x32 scales stay
    # within 2^14 (trained weights are far narrower); zeros and odd shapes included.
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=gen)
    w *= 2.0 ** torch.randint(-6, 6, (200, 1), generator=gen).float()
    w[0, :40] = 0.0
    packed, s = quantize_fp4(w)
    exact = dequantize_fp4(packed, s, 300)
    q8, s8 = fp4_to_fp8(packed, s, 300)
    assert q8.dtype == torch.float8_e4m3fn and s8.shape == (2, 3)
    assert torch.equal(dequantize_fp8(q8, s8), exact)


def test_fp4_to_fp8_refuses_to_round() -> None:
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 32] = 6.0, 6.0 * 2.0**-20  # sub-block scales 2^20 apart in one FP8 block
    packed, s = quantize_fp4(w)
    with pytest.raises(ValueError, match="would round"):
        fp4_to_fp8(packed, s, 64)


def test_fp8_linear_and_quantized_experts_match_dense() -> None:
    w = torch.randn(50, 70)
    q, s = quantize_fp8(w)
    layer = FP8Linear(q, s, dtype=torch.float32)
    x = torch.randn(4, 70)
    dense = dequantize_fp8(q, s)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense))
    assert torch.equal(layer.weight, dense)
    stacked = torch.randn(3, 20, 45)
    p, s4 = quantize_fp4(stacked)
    experts = QuantizedExperts(p, s4, tuple(stacked.shape), "fp4")
    assert experts.shape[0] == 3 and len(experts) == 3
    assert torch.equal(experts[1], dequantize_fp4(p[1], s4[1], 45))
    # The quantized form is what is held in memory.
    held = sum(b.numel() * b.element_size() for b in experts.buffers())
    assert held < stacked.numel() * 2 // 3
