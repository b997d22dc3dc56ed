"""Tests for dsv4.model.numerics: FP8/FP4 round trips and the Hadamard transform.

The round trips are checked bit for bit against a slow, independent reference that picks the
nearest value from an explicit code table (ties to the even code) with a float64 power-of-two
scale, so neither torch's float8 cast nor the production rounding trick is trusted blindly.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.model.numerics import (
    e2m1_values,
    fp4_e2m1_roundtrip,
    fp8_e4m3_roundtrip,
    hadamard_transform,
    round_to_e2m1,
    ue8m0_scale,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- independent reference -----------------------------------------------------------------


def _e4m3_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Finite non-negative float8_e4m3fn values with their codes (0x00..0x7E; 0x7F is NaN)."""
    codes = torch.arange(0x7F, dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn).double(), codes.long()


def _e2m1_table() -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    return values, torch.arange(8)


def _nearest_on_grid(q: torch.Tensor, grid: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Nearest grid magnitude to |q|, ties to the even code, sign restored, saturating."""
    magnitude = q.abs().clamp(max=grid.max().item())
    dist = (magnitude[:, None] - grid[None, :]).abs()  # [N, G]
    nearest = dist == dist.min(dim=1, keepdim=True).values
    preference = nearest.long() * (2 - codes % 2)[None, :]  # an even code wins a tie
    return torch.copysign(grid[preference.argmax(dim=1)], q)


def _reference_roundtrip(x: torch.Tensor, block: int, fmt: str) -> torch.Tensor:
    grid, codes = _e4m3_table() if fmt == "fp8" else _e2m1_table()
    qmax, floor = (448.0, 1e-4) if fmt == "fp8" else (6.0, 6.0 * 2.0**-126)
    blocks = x.detach().double().cpu().reshape(-1, block)
    out = torch.empty_like(blocks)
    for i, row in enumerate(blocks):
        amax = max(row.abs().max().item(), floor)
        scale = 2.0 ** math.ceil(math.log2(amax / qmax))
        out[i] = _nearest_on_grid(row / scale, grid, codes) * scale
    return out.reshape(x.shape)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


ROUNDTRIPS = [(fp8_e4m3_roundtrip, 64, "fp8"), (fp4_e2m1_roundtrip, 32, "fp4")]


def _random_blocks(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Gaussian data with per-row magnitudes spread over many binades."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.empty(rows, 1).uniform_(-6, 4, generator=g)
    return torch.randn(rows, width, generator=g) * magnitude


# --- scales and tables ---------------------------------------------------------------------


def test_ue8m0_scale_is_smallest_power_of_two_at_or_above_ratio():
    amax = torch.tensor([448.0, 448.0001, 224.0, 1.0, 896.0, 1e-4])
    assert ue8m0_scale(amax, 448.0).tolist() == [1.0, 2.0, 0.5, 2.0**-8, 2.0, 2.0**-22]
    assert ue8m0_scale(torch.tensor([6.0, 6.5, 3.0]), 6.0).tolist() == [1.0, 2.0, 0.5]
    assert ue8m0_scale(torch.tensor([6.0 * 2.0**-126]), 6.0).item() == 2.0**-126


def test_e2m1_values_table():
    values = e2m1_values()
    assert values.tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(values[8:], -values[:8])
    # every table value is a fixed point of the rounding
    assert torch.equal(round_to_e2m1(values), values)


def test_round_to_e2m1_ties_to_even_and_saturation():
    q = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 7.0, 100.0, 0.3, 0.2, -0.75])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.5, 0.0, -1.0]
    assert round_to_e2m1(q).tolist() == expected


# --- FP8 -----------------------------------------------------------------------------------


def test_fp8_exact_values_scale_one():
    # amax 448 -> scale exactly 1, so the output is the e4m3 grid itself.
    values = [448.0, 17.0, 19.0, 248.0, 2.0**-10, 1.5 * 2.0**-10, 3.0 * 2.0**-10, -0.1, 0.0]
    expected = [448.0, 16.0, 20.0, 256.0, 0.0, 2.0**-9, 2.0**-8, -0.1015625, 0.0]
    x = torch.zeros(64)
    x[: len(values)] = torch.tensor(values)
    assert fp8_e4m3_roundtrip(x)[: len(values)].tolist() == expected


def test_fp8_amax_above_448_doubles_the_scale():
    # 449 does not saturate: the UE8M0 scale becomes 2 and 449/2 = 224.5 rounds to 224.
    x = torch.zeros(64)
    x[:3] = torch.tensor([449.0, 3.0, 17.0])
    assert fp8_e4m3_roundtrip(x)[:3].tolist() == [448.0, 3.0, 16.0]


def test_fp8_amax_floor():
    # amax is floored at 1e-4: scale 2^-22, so 1e-9 lands in the e4m3 subnormals (2 * 2^-9).
    x = torch.full((64,), 1e-9)
    assert torch.equal(fp8_e4m3_roundtrip(x), torch.full((64,), 2.0 * 2.0**-9 * 2.0**-22))
    assert torch.equal(fp8_e4m3_roundtrip(torch.zeros(2, 64)), torch.zeros(2, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_matches_reference_exactly(fn, block, fmt, device):
    x = _random_blocks(48, 2 * block).to(device)
    assert torch.equal(fn(x, block).cpu().double(), _reference_roundtrip(x, block, fmt))


@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_other_block_size(fn, block, fmt):
    x = _random_blocks(8, 256, seed=1)
    assert torch.equal(fn(x, 128).double(), _reference_roundtrip(x, 128, fmt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_is_idempotent(fn, block, fmt, dtype, device):
    x = _random_blocks(32, 4 * block, seed=2).to(device=device, dtype=dtype)
    once = fn(x, block)
    assert torch.equal(fn(once, block), once)


def test_fp8_relative_error_bound():
    # 3 mantissa bits: |err| <= 2^-4 |x| for normals, half a subnormal step (2^-10 * scale) below.
    x = _random_blocks(64, 64, seed=3)
    scale = ue8m0_scale(x.abs().amax(-1, keepdim=True).clamp(min=1e-4), 448.0)
    err = (fp8_e4m3_roundtrip(x) - x).abs()
    assert bool((err <= x.abs() * 2.0**-4 + scale * 2.0**-10).all())
    gaussian = torch.randn(256, 512, generator=torch.Generator().manual_seed(4))
    rel = (fp8_e4m3_roundtrip(gaussian) - gaussian).norm() / gaussian.norm()
    assert rel < 0.04


def test_fp4_relative_error_bound():
    # 1 mantissa bit: |err| <= |x| / 4 on normals (|q| >= 1), <= scale / 4 below.
    x = _random_blocks(64, 32, seed=5)
    scale = ue8m0_scale(x.abs().amax(-1, keepdim=True), 6.0)
    err = (fp4_e2m1_roundtrip(x) - x).abs()
    assert bool((err <= x.abs() / 4 + scale / 4).all())
    gaussian = torch.randn(256, 512, generator=torch.Generator().manual_seed(6))
    rel = (fp4_e2m1_roundtrip(gaussian) - gaussian).norm() / gaussian.norm()
    assert rel < 0.2


def test_fp4_exact_values_and_ties():
    # amax 6 -> scale 1; then amax 12 -> scale 2 in the second block.
    first = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 5.5, 0.3]
    x = torch.zeros(64)
    x[: len(first)] = torch.tensor(first)
    x[32:35] = torch.tensor([12.0, 1.0, 1.5])
    y = fp4_e2m1_roundtrip(x)
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -4.0, 6.0, 0.5]
    assert y[: len(first)].tolist() == expected
    assert y[32:35].tolist() == [12.0, 1.0, 2.0]  # 1.5 / 2 = 0.75 is a tie -> 1 -> 2


def test_fp4_tiny_block_keeps_relative_precision():
    # Official E8M0 branch floors amax at 6 * 2^-126, not 1e-4: tiny blocks are not zeroed.
    x = torch.full((32,), 3e-20)
    y = fp4_e2m1_roundtrip(x)
    assert bool((y > 0).all()) and torch.allclose(y, x, rtol=0.25)


@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_blocks_are_independent(fn, block, fmt):
    x = _random_blocks(4, 3 * block, seed=7)
    y = fn(x, block)
    scaled = x.clone()
    scaled[:, block : 2 * block] *= 1000.0
    z = fn(scaled, block)
    assert torch.equal(z[:, :block], y[:, :block])
    assert torch.equal(z[:, 2 * block :], y[:, 2 * block :])
    assert not torch.equal(z[:, block : 2 * block], y[:, block : 2 * block])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_keeps_dtype_and_shape(fn, block, fmt, dtype):
    x = torch.randn(2, 3, 2 * block).to(dtype)
    y = fn(x, block)
    assert y.dtype == dtype and y.shape == x.shape
    # bf16 holds every dequantized value exactly (same exponent range as fp32)
    if dtype == torch.bfloat16:
        assert torch.equal(y.double(), _reference_roundtrip(x, block, fmt))


@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_non_contiguous_input(fn, block, fmt):
    x = torch.randn(2 * block, 6).t()  # [6, 2*block], non-contiguous
    assert torch.equal(fn(x, block), fn(x.contiguous(), block))


@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_gradient_is_straight_through(fn, block, fmt):
    x = torch.randn(3, block, requires_grad=True)
    fn(x, block).mul(torch.arange(block)).sum().backward()
    assert torch.equal(x.grad, torch.arange(block).float().expand(3, block))


@pytest.mark.parametrize("fn,block,fmt", ROUNDTRIPS)
def test_roundtrip_rejects_bad_input(fn, block, fmt):
    with pytest.raises(ValueError, match=f"last dimension {block + 4} .* block size {block}"):
        fn(torch.zeros(2, block + 4), block)
    with pytest.raises(ValueError, match="block size must be positive"):
        fn(torch.zeros(2, block), 0)
    with pytest.raises(TypeError, match="torch.int64"):
        fn(torch.zeros(2, block, dtype=torch.int64), block)


# --- Hadamard ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 128, 512])
def test_hadamard_matches_sylvester_matrix(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = x @ _sylvester(n) / math.sqrt(n)
    torch.testing.assert_close(hadamard_transform(x), expected, rtol=1e-12, atol=1e-12)


def test_hadamard_is_orthogonal_and_self_inverse():
    n = 128
    h = hadamard_transform(torch.eye(n, dtype=torch.float64))  # rows of the transform matrix
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(4, 7, n)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x)
    torch.testing.assert_close(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_dtype_and_device(device):
    x = torch.randn(3, 2, 128, device=device).bfloat16()
    y = hadamard_transform(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and y.device == x.device
    expected = (x.double().cpu() @ _sylvester(128) / math.sqrt(128)).bfloat16()
    torch.testing.assert_close(y.cpu(), expected, rtol=0, atol=0)


def test_hadamard_gradient():
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 16, dtype=torch.float64)
    (hadamard_transform(x) * weight).sum().backward()
    # symmetric orthogonal H: d/dx <Hx, w> = H w
    torch.testing.assert_close(x.grad, hadamard_transform(weight))


@pytest.mark.parametrize("n", [0, 3, 96, 130])
def test_hadamard_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match=f"last dimension {n} .* not a power of two"):
        hadamard_transform(torch.zeros(2, n))
