"""Map state dicts between dsv4 names and transformers' `DeepseekV4ForCausalLM` names.

dsv4 uses the official checkpoint names, with routed experts stacked per layer
(`layers.L.ffn.experts.w1 [E, inter, dim]`). transformers additionally stacks gate and up into
`mlp.experts.gate_up_proj [E, 2*inter, dim]` (gate first). transformers has no MTP block, so
`mtp.*` tensors are dropped on export and absent on import.
"""

from __future__ import annotations

import re

import torch

from dsv4.model.config import ModelConfig

# Renames of whole name segments, applied to the part after `layers.L.` (ours -> transformers).
# Order matters: longer, more specific prefixes first.
_LAYER_RULES: list[tuple[str, str]] = [
    ("attn.indexer.compressor.wkv.", "self_attn.compressor.indexer.kv_proj."),
    ("attn.indexer.compressor.wgate.", "self_attn.compressor.indexer.gate_proj."),
    ("attn.indexer.compressor.norm.", "self_attn.compressor.indexer.kv_norm."),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.wq_b.", "self_attn.compressor.indexer.q_b_proj."),
    ("attn.indexer.weights_proj.", "self_attn.compressor.indexer.scorer.weights_proj."),
    ("attn.compressor.wkv.", "self_attn.compressor.kv_proj."),
    ("attn.compressor.wgate.", "self_attn.compressor.gate_proj."),
    ("attn.compressor.norm.", "self_attn.compressor.kv_norm."),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_norm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv.", "self_attn.kv_proj."),
    ("attn.kv_norm.", "self_attn.kv_norm."),
    ("attn.wo_a.", "self_attn.o_a_proj."),
    ("attn.wo_b.", "self_attn.o_b_proj."),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.", "mlp.gate."),
    ("ffn.shared_experts.w1.", "mlp.shared_experts.gate_proj."),
    ("ffn.shared_experts.w2.", "mlp.shared_experts.down_proj."),
    ("ffn.shared_experts.w3.", "mlp.shared_experts.up_proj."),
    ("ffn.experts.w2", "mlp.experts.down_proj"),
]

_TOP_RULES: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rename(rest: str, rules: list[tuple[str, str]]) -> str | None:
    for src, dst in rules:
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """dsv4 names -> transformers names. MTP tensors are dropped (transformers has no MTP)."""
    out: dict[str, torch.Tensor] = {}
    pending_gate_up: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.startswith("mtp."):
            continue
        if key in _TOP_RULES:
            out[_TOP_RULES[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise KeyError(f"unknown dsv4 tensor name {key!r}")
        layer, rest = int(match.group(1)), match.group(2)
        if rest in ("ffn.experts.w1", "ffn.experts.w3"):
            pending_gate_up.setdefault(layer, {})[rest[-2:]] = tensor
            continue
        new_rest = _rename(rest, _LAYER_RULES)
        if new_rest is None:
            raise KeyError(f"unknown dsv4 tensor name {key!r}")
        out[f"model.layers.{layer}.{new_rest}"] = tensor
    for layer, parts in pending_gate_up.items():
        if set(parts) != {"w1", "w3"}:
            raise KeyError(
                f"layer {layer}: routed experts need both w1 and w3, got {sorted(parts)}"
            )
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat(
            (parts["w1"], parts["w3"]), dim=1
        )
    _check_layers(out, config, hf=True)
    return out


def from_hf_state_dict(
    state_dict: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """transformers names -> dsv4 names. Non-persistent rotary buffers are skipped; MTP weights
    are not in a transformers state dict, so load the result with `strict=False` if the model
    has an MTP block (or initialize it yourself)."""
    inverse_top = {v: k for k, v in _TOP_RULES.items()}
    inverse_layer = sorted(((dst, src) for src, dst in _LAYER_RULES), key=lambda r: -len(r[0]))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if "inv_freq" in key:
            continue
        if key in inverse_top:
            out[inverse_top[key]] = tensor
            continue
        match = _HF_LAYER_KEY.match(key)
        if match is None:
            raise KeyError(f"unknown transformers tensor name {key!r}")
        layer, rest = int(match.group(1)), match.group(2)
        if rest == "mlp.experts.gate_up_proj":
            inter = tensor.shape[1] // 2
            out[f"layers.{layer}.ffn.experts.w1"] = tensor[:, :inter]
            out[f"layers.{layer}.ffn.experts.w3"] = tensor[:, inter:]
            continue
        new_rest = _rename(rest, inverse_layer)
        if new_rest is None:
            raise KeyError(f"unknown transformers tensor name {key!r}")
        out[f"layers.{layer}.{new_rest}"] = tensor
    _check_layers(out, config, hf=False)
    return out


def _check_layers(state_dict: dict[str, torch.Tensor], config: ModelConfig, hf: bool) -> None:
    """Reject state dicts whose layer indices do not fit the config."""
    pattern = _HF_LAYER_KEY if hf else _LAYER_KEY
    for key in state_dict:
        match = pattern.match(key)
        if match and int(match.group(1)) >= config.n_layers:
            raise KeyError(f"tensor {key!r} has layer index >= n_layers={config.n_layers}")


# ---- name-level mappings used by the checkpoint reader/writer -------------------------------
# Our names -> transformers runtime names, one tensor at a time. `w1`/`w3` map to the two halves
# of `gate_up_proj`, returned as (name, half) with half 0 = gate (rows :inter), 1 = up.
def hf_runtime_name(name: str) -> tuple[str, int | None] | None:
    """transformers' `DeepseekV4ForCausalLM` parameter name of one of our tensors (and the half
    of `gate_up_proj` for routed w1 / w3); None for tensors transformers lacks (`mtp.*`)."""
    if name.startswith("mtp."):
        return None
    if name in _TOP_RULES:
        return _TOP_RULES[name], None
    match = _LAYER_KEY.match(name)
    if match is None:
        raise KeyError(f"unknown dsv4 tensor name {name!r}")
    layer, rest = match.group(1), match.group(2)
    if rest in ("ffn.experts.w1", "ffn.experts.w3"):
        return f"model.layers.{layer}.mlp.experts.gate_up_proj", 0 if rest.endswith("w1") else 1
    new_rest = _rename(rest, _LAYER_RULES)
    if new_rest is None:
        raise KeyError(f"unknown dsv4 tensor name {name!r}")
    return f"model.layers.{layer}.{new_rest}", None


# What `DeepseekV4ForCausalLM.save_pretrained` (transformers 5.x) writes: its conversion mapping
# runs backwards on save, which restores the official names with routed experts split
# per expert, but leaves a `model.` prefix on everything except `head.weight`, renames the top
# level like the runtime names, and turns the attention's `kv_norm` into `norm` (the inverse of
# the compressor's `norm -> kv_norm`). Checked against a real save in tests/test_convert.py.
_SAVED_TOP: dict[str, str] = {**_TOP_RULES, "head.weight": "head.weight"}
_KV_NORM = re.compile(r"^(layers\.\d+\.attn\.)kv_norm\.")


def hf_saved_name(official_name: str) -> str:
    """The name `save_pretrained` gives a tensor whose official name is given.
    `mtp.*` keeps its official name (transformers ignores it on load; vLLM reads it)."""
    if official_name in _SAVED_TOP:
        return _SAVED_TOP[official_name]
    if official_name.startswith("mtp."):
        return official_name
    if not official_name.startswith("layers."):
        raise KeyError(f"unknown official tensor name {official_name!r}")
    return "model." + _KV_NORM.sub(r"\1norm.", official_name)
