"""Shared helpers for tests that compare dsv4 with transformers' DeepseekV4ForCausalLM, and a
tiny training corpus."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch

from dsv4 import ModelConfig
from dsv4.model.network import Gate, Transformer, random_hash_table


def tiny_config(**overrides) -> ModelConfig:
    """All three layer types with the real compression rates 4 and 128, hash layers, MTP."""
    fields = dict(
        vocab_size=160,
        dim=64,
        n_layers=4,
        n_heads=4,
        head_dim=32,
        rope_head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        compress_ratios=[0, 4, 128, 4, 0],
        window_size=128,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=8,
        n_routed_experts=8,
        n_activated_experts=2,
        moe_inter_dim=32,
        n_hash_layers=2,
        max_seq_len=4096,
        original_seq_len=256,
        dtype="bf16",
        expert_dtype="bf16",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def randomize(model: Transformer, seed: int = 0) -> Transformer:
    """Random weights scaled so activations and logits are O(1) and far from zero: every tensor
    (sinks, ape, router bias, mHC gates and biases, norm weights) is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        shape = p.shape
        if leaf.endswith("_fn"):
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        elif leaf.endswith("_base") or leaf in ("attn_sink", "bias", "ape"):
            value = torch.randn(shape, generator=gen)
        elif leaf.endswith("_scale"):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif p.dim() == 1:  # norm weights
            value = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("embed.weight"):
            value = torch.randn(shape, generator=gen)
        else:  # matrices, including stacked experts [E, out, in]
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        p.copy_(value)
    for module in model.modules():
        if isinstance(module, Gate) and module.hash_routed:
            module.tid2eid.copy_(random_hash_table(model.cfg, gen))
    return model


def hf_model_from(model: Transformer):
    """A transformers DeepseekV4ForCausalLM holding the same weights (fp32, eager)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from dsv4.weights.convert import to_hf_state_dict

    hf_cfg = DeepseekV4Config(**model.cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(
        to_hf_state_dict(model.state_dict(), model.cfg), strict=False
    )
    missing = [k for k in missing if "inv_freq" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


STDLIB_MODULES = ("textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py")


def stdlib_corpus(root: Path, modules=STDLIB_MODULES, **config) -> dict[str, Path]:
    """A tiny model config (`tiny.json`, vocab 384, one hash layer, `config` overrides) and a
    small real corpus: a few modules of the running Python's standard library."""
    data = root / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in modules:
        (data / name).write_text((stdlib / name).read_text())
    path = root / "tiny.json"
    tiny_config(vocab_size=384, n_hash_layers=1, **config).save(path)
    return dict(root=root, data=data, config=path, cache=root / "cache")
