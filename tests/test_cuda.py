"""GPU checks (skipped without CUDA): fp32 parity on the GPU, and bf16 error no worse than
transformers' own bf16 error against the same fp32 reference."""

from __future__ import annotations

import pytest
import torch

from dsv4.model.network import Transformer
from tests.parity_utils import hf_model_from, randomize, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("transformers")


def inputs(cfg, length: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, length), generator=gen)


def test_cuda_fp32_logits_equal_cpu_and_transformers() -> None:
    ours = randomize(Transformer(tiny_config()), seed=1).eval()
    hf = hf_model_from(ours)
    ids = inputs(ours.cfg)
    with torch.no_grad():
        on_cpu = ours(ids)
        ours, hf = ours.cuda(), hf.cuda()
        on_gpu = ours(ids.cuda()).cpu()
        reference = hf(ids.cuda()).logits.cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(on_gpu, reference, atol=1e-4, rtol=1e-4)


def test_cuda_bf16_error_is_no_worse_than_transformers_bf16() -> None:
    ours = randomize(Transformer(tiny_config()), seed=2).eval()
    hf = hf_model_from(ours)
    ids = inputs(ours.cfg).cuda()
    with torch.no_grad():
        exact = ours.cuda()(ids)
        ours_bf16 = ours.to(torch.bfloat16)(ids).float()
        hf_bf16 = hf.cuda().to(torch.bfloat16)(ids).logits.float()

    def rel(x: torch.Tensor) -> float:
        return ((x - exact).norm() / exact.norm()).item()

    print(f"bf16 relative error: dsv4 {rel(ours_bf16):.3e}, transformers {rel(hf_bf16):.3e}")
    assert rel(ours_bf16) < 0.1
    assert rel(ours_bf16) <= 1.5 * rel(hf_bf16) + 1e-3
