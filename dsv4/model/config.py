"""Model configuration: one dataclass that mirrors the official `inference/config.json`.

Field names follow the official reference code (`dim`, `n_layers`, `compress_ratios`, ...).
Readers and writers for the three JSON dialects in circulation (official `config.json`,
`inference/config.json`, transformers `DeepseekV4Config`) live at the bottom of this file.
The config is plain data: it never imports the network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.errors import Error
from dsv4.files import write_json_atomic

# compress ratio -> attention kind (official `compress_ratios`; V4 report: CSA and HCA)
LAYER_KINDS = {0: "sliding", 4: "csa", 128: "hca"}
HF_LAYER_TYPES = {
    0: "sliding_attention",
    4: "compressed_sparse_attention",
    128: "heavily_compressed_attention",
}


class ConfigError(Error, ValueError):
    """An invalid model configuration; the message names the offending field.

    `field` is the ModelConfig field at fault (None when the fault is in a file's own keys);
    the JSON readers use it to name the key of the file instead.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    # attention schedule: one entry per main layer plus one per MTP block (0 / 4 / 128)
    compress_ratios: list[int] = field(
        default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0]
    )
    window_size: int = 128
    # Lightning Indexer (CSA layers)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # norms, RoPE / YaRN
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    max_seq_len: int = 1048576
    # multi-token prediction
    n_mtp_layers: int = 1
    # tokens
    bos_token_id: int = 0
    eos_token_id: int = 1
    # weight storage of the released checkpoints (informational for the network)
    dtype: str = "fp8"
    expert_dtype: str = "fp4"
    scale_fmt: str | None = "ue8m0"
    # QAT numerics simulation (FP8 KV, FP4 indexer; official `act_quant`, `fp4_act_quant`): off
    # by default
    quant_sim: bool = False
    # Ablation switch (bench/train_mhc.py): a plain residual stream x + F(x) instead of mHC.
    # The mHC parameters stay in the model (unused), so state dicts keep their names.
    hc_plain_residual: bool = False

    def __post_init__(self) -> None:
        ratios = self.compress_ratios
        if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
            raise ConfigError(f"compress_ratios={ratios!r}: must be a list of integers",
                              field="compress_ratios")
        if not all(is_int(r) for r in ratios):
            raise ConfigError(f"compress_ratios={list(ratios)!r}: entries must be integers",
                              field="compress_ratios")
        self.compress_ratios = list(ratios)
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def layer_kinds(self) -> list[str]:
        """Attention kind ("sliding", "csa", "hca") of every main layer."""
        return [LAYER_KINDS[r] for r in self.compress_ratios[: self.n_layers]]

    @property
    def mtp_compress_ratio(self) -> int:
        return self.compress_ratios[self.n_layers] if self.n_mtp_layers else 0

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {msg}", field=name)

        for name in (
            "vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
            "o_lora_rank", "window_size", "index_n_heads", "index_head_dim", "index_topk",
            "n_routed_experts", "n_activated_experts", "moe_inter_dim", "hc_mult",
            "hc_sinkhorn_iters", "max_seq_len", "rope_head_dim",
        ):
            value = getattr(self, name)
            need(is_int(value) and value > 0, name, "must be a positive integer")
        for name in ("n_shared_experts", "n_hash_layers", "n_mtp_layers",
                     "original_seq_len", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            need(is_int(value) and value >= 0, name, "must be a non-negative integer")
        for name in ("norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "rope_factor",
                     "swiglu_limit", "route_scale"):
            value = getattr(self, name)
            need(is_number(value) and value > 0, name, "must be a positive number")
        need(isinstance(self.quant_sim, bool), "quant_sim", "must be true or false")
        need(isinstance(self.hc_plain_residual, bool), "hc_plain_residual",
             "must be true or false")
        need(self.n_mtp_layers <= 1, "n_mtp_layers", "only MTP depth 0 or 1 is supported")
        need(len(self.compress_ratios) == self.n_layers + self.n_mtp_layers, "compress_ratios",
             f"needs n_layers + n_mtp_layers = {self.n_layers + self.n_mtp_layers} entries "
             f"(one per layer, then one per MTP block), got {len(self.compress_ratios)}")
        bad = [r for r in self.compress_ratios if r not in LAYER_KINDS]
        need(not bad, "compress_ratios", f"unknown layer type(s) {bad}; allowed 0 (sliding), "
             "4 (CSA), 128 (HCA)")
        need(self.rope_head_dim % 2 == 0 and self.rope_head_dim <= self.head_dim,
             "rope_head_dim", f"must be even and at most head_dim={self.head_dim}")
        need(self.rope_head_dim <= self.index_head_dim, "rope_head_dim",
             f"must fit in index_head_dim={self.index_head_dim}")
        need(self.n_heads % self.o_groups == 0, "o_groups",
             f"must divide n_heads={self.n_heads}")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"cannot exceed n_routed_experts={self.n_routed_experts}")
        need(self.n_hash_layers <= self.n_layers, "n_hash_layers",
             f"cannot exceed n_layers={self.n_layers}")
        need(self.score_func in ("sqrtsoftplus", "softmax", "sigmoid"), "score_func",
             "must be 'sqrtsoftplus', 'softmax' or 'sigmoid'")
        need(self.beta_fast > self.beta_slow, "beta_fast",
             f"must exceed beta_slow={self.beta_slow}")
        need(self.dtype in ("fp8", "bf16"), "dtype", "must be 'fp8' or 'bf16'")
        need(self.expert_dtype in ("fp4", "fp8", "bf16"), "expert_dtype",
             "must be 'fp4', 'fp8' or 'bf16'")
        # The reference code knows UE8M0 (power-of-two) scales or, with None, plain fp32 scales.
        need(self.scale_fmt in ("ue8m0", None), "scale_fmt", "must be 'ue8m0' or null")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(is_int(value) and 0 <= value < self.vocab_size, name,
                 f"must be a token id below vocab_size={self.vocab_size}")
        if self.quant_sim:
            self._validate_quant_sim(need)
        # The MTP block's slot counts too: a CSA MTP block also runs the indexer.
        if 4 in self.compress_ratios:
            max_entries = self.max_seq_len // 4
            need(self.index_topk <= max_entries, "index_topk",
                 f"cannot exceed the number of CSA entries at max_seq_len ({max_entries})")

    def _validate_quant_sim(self, need) -> None:
        """The simulated FP8/FP4 blocks must tile the tensors they quantize."""
        need(self.nope_head_dim % 64 == 0, "head_dim",
             "quant_sim needs head_dim - rope_head_dim divisible by 64 (FP8 KV blocks)")
        size = self.index_head_dim
        need(size % 32 == 0 and size & (size - 1) == 0, "index_head_dim",
             "quant_sim needs a power of two divisible by 32 (Hadamard, FP4 blocks)")
        for name in ("dim", "q_lora_rank", "moe_inter_dim"):
            need(getattr(self, name) % 128 == 0, name,
                 "quant_sim needs a multiple of 128 (FP8 activation blocks)")
        need(self.o_groups * self.o_lora_rank % 128 == 0, "o_lora_rank",
             "quant_sim needs o_groups * o_lora_rank divisible by 128 (FP8 activation blocks)")

    # ---- presets ----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from ModelConfig's own field names (what `to_dict` writes)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}", field=unknown[0])
        return cls(**data)

    # ---- JSON dialects (implemented at the bottom of this file) -------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read an official, `inference/` or transformers config.json (or a folder holding one).

        The dialect is detected from the keys; see `detect_dialect`.
        """
        return read_config_file(path)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Parse the dict of any of the three JSON dialects; `source` names it in errors."""
        return parse_config_dict(data, source)

    def to_official_dict(self) -> dict[str, Any]:
        """The HF-repo `config.json` the DeepSeek releases ship."""
        return _to_official(self)

    def to_inference_dict(self) -> dict[str, Any]:
        """`inference/config.json`: the official `ModelArgs(**json)` can load it."""
        return _to_inference(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """What `transformers.DeepseekV4Config(**d)` accepts and `save_pretrained` writes."""
        return _to_hf(self)

    def save(self, path: str | os.PathLike[str], dialect: str = "official") -> Path:
        """Write the config as JSON, atomically; a folder gets `config.json` inside it."""
        writers = {"official": _to_official, "inference": _to_inference, "hf": _to_hf}
        if dialect not in writers:
            raise ConfigError(f"dialect={dialect!r}: must be one of {sorted(writers)}")
        target = Path(path)
        if target.is_dir():
            target = target / "config.json"
        write_json_atomic(target, writers[dialect](self))
        return target


PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V4-Flash: 43 layers, 2 sliding + 21 CSA + 20 HCA, MTP block sliding.
    "v4-flash": {},
    # DeepSeek-V4-Pro: 61 layers, 2 HCA then CSA/HCA interleaved.
    "v4-pro": dict(
        dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
        n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5,
        compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0],
    ),
    # A few million parameters: every V4 part at laptop size (all three layer types, a hash
    # layer, mHC, MTP), real compression rates 4 and 128.
    "nano": dict(
        vocab_size=4096, dim=256, n_layers=4, n_heads=4, head_dim=128, rope_head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, compress_ratios=[0, 4, 128, 4, 0],
        index_n_heads=4, index_head_dim=64, index_topk=32, n_routed_experts=8,
        n_activated_experts=2, moe_inter_dim=128, n_hash_layers=1, route_scale=1.5,
        max_seq_len=65536, original_seq_len=4096, rope_factor=16.0,
        dtype="bf16", expert_dtype="bf16",
    ),
    # Tens of millions: for inference benchmarks and longer CPU runs.
    # index_head_dim stays a multiple of 64 (llama.cpp requires it).
    "small": dict(
        vocab_size=16384, dim=512, n_layers=6, n_heads=8, head_dim=128, rope_head_dim=64,
        q_lora_rank=256, o_groups=4, o_lora_rank=256, compress_ratios=[0, 4, 128, 4, 128, 4, 0],
        index_n_heads=8, index_head_dim=64, index_topk=128, n_routed_experts=8,
        n_activated_experts=2, moe_inter_dim=256, n_hash_layers=1, route_scale=1.5,
        max_seq_len=262144, original_seq_len=16384, rope_factor=16.0,
        dtype="bf16", expert_dtype="bf16",
    ),
}


# =========================================================================================
# JSON dialects
# =========================================================================================
#
# One config, three spellings in circulation:
#   official   the HF-repo `config.json` DeepSeek ships: HF-style key names,
#              `compress_ratios` with n_layers + 1 entries, `rope_scaling`, `quantization_config`
#              plus a top-level `expert_dtype`.
#   inference  the reference code's `inference/config.json`: the `ModelArgs` names
#              our fields mirror; unlisted fields fall back to the defaults.
#   hf         what transformers' `DeepseekV4Config.save_pretrained` writes:
#              `layer_types`, `mlp_layer_types`, `compress_rates`, nested `rope_parameters`,
#              `partial_rotary_factor`, and no `compress_ratios` (the MTP slot then reads as 0,
#              the value of both released models).
#
# What a dialect cannot carry comes back as the ModelConfig default after a round trip:
#   all three   quant_sim (a runtime choice, not a property of the weights) and
#               hc_plain_residual (an ablation of ours, not a V4 model).
#   inference   bos_token_id, eos_token_id: the official `ModelArgs(**json)` has no such fields
#               and would refuse them.
#   official,hf scale_fmt when dtype == "bf16" (no quantization_config is written), and
#               rope_factor / beta_fast / beta_slow when original_seq_len == 0 (no YaRN).
#   hf          nothing more: a non-zero MTP-slot ratio is written as an extra legacy
#               `compress_ratios` key, which transformers accepts and ignores.
# Everything else, dtype and expert_dtype included, survives every dialect.

DIALECTS = ("official", "inference", "hf")

# official / hf key -> ModelConfig field, for the keys that map one to one
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hash_layers": "n_hash_layers",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "max_position_embeddings": "max_seq_len",
    "num_nextn_predict_layers": "n_mtp_layers",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "compress_ratios": "compress_ratios",
    "expert_dtype": "expert_dtype",
}
# Keys with a single supported value: any other value would change the math.
_HF_FIXED: dict[str, Any] = {
    "model_type": "deepseek_v4",
    "num_key_value_heads": 1,  # one shared K=V head (MQA)
    "hidden_act": "silu",
    "norm_topk_prob": True,  # the router always renormalises its top-k weights
    "topk_method": "noaux_tc",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
}
# Bookkeeping, training-only and runtime keys that do not describe the network.
_HF_IGNORED = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pad_token_id", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "_name_or_path", "output_hidden_states", "output_attentions",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type",
}
# Keys read by dedicated code below.
_HF_SPECIAL = {
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "layer_types",
    "mlp_layer_types", "compress_rates", "compress_rate_csa", "compress_rate_hca",
    "quantization_config",
}
# Runtime-only `ModelArgs` fields of the reference code (batch size of its static cache, scale
# storage of its kernels), and `n_routed_experts_score`, found only in one third-party copy
# of the Flash `inference/config.json` and read by nothing.
_INFERENCE_IGNORED = {"max_batch_size", "scale_dtype", "n_routed_experts_score"}
# The reference `ModelArgs` keys, in the order of the Flash `inference/config.json` (then the
# ones it leaves out).
_INFERENCE_KEYS = (
    "vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads",
    "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func", "route_scale",
    "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim", "o_groups", "o_lora_rank",
    "window_size", "original_seq_len", "rope_theta", "rope_factor", "beta_fast", "beta_slow",
    "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "dtype",
    "scale_fmt", "expert_dtype", "compress_rope_theta", "compress_ratios", "norm_eps", "hc_eps",
    "n_mtp_layers", "max_seq_len",
)
_HF_RATIO_OF_TYPE = {name: ratio for ratio, name in HF_LAYER_TYPES.items()}
_HF_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_QUANT_BLOCK = [128, 128]
_ROPE_MAIN_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_ROPE_YARN_KEYS = _ROPE_MAIN_KEYS | {
    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
}


def _default(name: str) -> Any:
    f = ModelConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def is_int(value: Any) -> bool:
    """An int and not a bool (True is an int to Python, never a count or a token id here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 16 and 16.0 agree, True and 1 do not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _key_error(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: key {key!r}: {message}")


def _agree(source: str, claims: list[tuple[str, Any]]) -> Any:
    """The common value of all (key, value) claims that are not None; None if there are none."""
    present = [(key, value) for key, value in claims if value is not None]
    if not present:
        return None
    first_key, first = present[0]
    for key, value in present[1:]:
        if not _same(value, first):
            raise _key_error(source, key, f"{value!r} contradicts {first_key!r}={first!r}")
    return first


def _need_dict(source: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _key_error(source, key, f"must be a JSON object, got {value!r}")
    return value


def _need_list(source: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _key_error(source, key, f"must be a JSON list, got {value!r}")
    return value


def detect_dialect(data: dict[str, Any], source: str = "<dict>") -> str:
    """"official", "inference" or "hf", from the keys of a parsed config.json."""
    inference = sorted({"dim", "n_layers", "n_heads", "moe_inter_dim"} & data.keys())
    hf = sorted({"hidden_size", "num_hidden_layers", "num_attention_heads",
                 "moe_intermediate_size"} & data.keys())
    if inference and hf:
        raise _key_error(source, inference[0], f"an inference/config.json key next to the "
                         f"config.json key {hf[0]!r}; a file must use one dialect")
    if inference:
        return "inference"
    if hf:
        return "official" if "compress_ratios" in data else "hf"
    raise ConfigError(f"{source}: not a DeepSeek-V4 config: it has neither 'hidden_size' "
                      "(config.json) nor 'dim' (inference/config.json)")


def parse_config_dict(data: Any, source: str = "<dict>") -> ModelConfig:
    """A ModelConfig from the parsed JSON of any dialect; errors name `source` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if detect_dialect(data, source) == "inference":
        return _read_inference(data, source)
    return _read_hf_family(data, source)


def read_config_file(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a config.json of any dialect, or the `config.json` inside a folder."""
    target = Path(path)
    if target.is_dir():
        target = target / "config.json"
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{target}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{target}: cannot read: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{target}: not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}") from None
    return parse_config_dict(data, str(target))



def _build(values: dict[str, Any], source: str, key_of: dict[str, str]) -> ModelConfig:
    """Construct and validate; a validation error names the file and the file's own key."""
    for f in dataclasses.fields(ModelConfig):
        value = values.get(f.name)
        if f.type == "float" and is_int(value):
            values[f.name] = float(value)  # JSON writes 10000 for 10000.0
    try:
        return ModelConfig(**values)
    except ConfigError as err:
        key = key_of.get(err.field or "", err.field)
        where = f"key {key!r}: " if key else ""
        raise ConfigError(f"{source}: {where}{err}", field=err.field) from None


# ---- readers ----------------------------------------------------------------------------
def _read_inference(data: dict[str, Any], source: str) -> ModelConfig:
    # ModelConfig is a superset of the reference ModelArgs, so its field names are the keys.
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _INFERENCE_IGNORED:
            continue
        if key not in known:
            raise _key_error(source, key, "unknown key for an inference/config.json")
        values[key] = value
    # ModelArgs: expert_dtype None means "experts stored like every other weight".
    if values.get("expert_dtype") is None:
        values["expert_dtype"] = values.get("dtype", _default("dtype"))
    return _build(values, source, {})


def _read_hf_family(data: dict[str, Any], source: str) -> ModelConfig:
    """Official and transformers config.json: one reader, with consistency checks between
    the keys the two spell differently (`compress_ratios` vs `layer_types`, ...)."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _HF_FIELDS:
            values[_HF_FIELDS[key]] = value
        elif key in _HF_FIXED:
            if not _same(value, _HF_FIXED[key]):
                raise _key_error(source, key, f"{value!r} is not supported; DeepSeek-V4 "
                                 f"uses {_HF_FIXED[key]!r}")
        elif key not in _HF_IGNORED and key not in _HF_SPECIAL:
            raise _key_error(source, key, "unknown key for a DeepSeek-V4 config.json")
    eos = values.get("eos_token_id")
    if isinstance(eos, list) and len(eos) == 1:  # transformers allows a list of stop ids
        values["eos_token_id"] = eos[0]
    _read_rope_head_dim(data, values, source)
    _read_rope(data, values, source)
    _read_schedule(data, values, source)
    _read_quantization(data, values, source)
    return _build(values, source, _hf_key_of_field(data))


def _hf_key_of_field(data: dict[str, Any]) -> dict[str, str]:
    key_of = {field_name: key for key, field_name in _HF_FIELDS.items()}
    rope = "rope_scaling" if "rope_scaling" in data else "rope_parameters.compress"
    key_of.update(
        rope_factor=f"{rope}.factor",
        original_seq_len=f"{rope}.original_max_position_embeddings",
        beta_fast=f"{rope}.beta_fast",
        beta_slow=f"{rope}.beta_slow",
        dtype="quantization_config",
        scale_fmt="quantization_config.scale_fmt",
    )
    if "compress_ratios" not in data:
        key_of["compress_ratios"] = "layer_types"
    if "qk_rope_head_dim" not in data:
        key_of["rope_head_dim"] = "partial_rotary_factor"
    if "num_hash_layers" not in data:
        key_of["n_hash_layers"] = "mlp_layer_types"
    return key_of


def _read_rope_head_dim(data: dict[str, Any], values: dict[str, Any], source: str) -> None:
    # transformers stores the RoPE width as a fraction of head_dim, possibly in three places.
    head_dim = values.get("head_dim", _default("head_dim"))
    if not is_int(head_dim):
        return  # validation reports head_dim
    first = values.get("rope_head_dim")
    first_key = "qk_rope_head_dim"
    factors = [("partial_rotary_factor", data.get("partial_rotary_factor"))]
    params = data.get("rope_parameters")
    if isinstance(params, dict):
        for label in ("main", "compress"):
            sub = params.get(label)
            if isinstance(sub, dict):
                key = f"rope_parameters.{label}.partial_rotary_factor"
                factors.append((key, sub.get("partial_rotary_factor")))
    for key, factor in factors:
        if factor is None:
            continue
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise _key_error(source, key, f"must be a number, got {factor!r}")
        width = factor * head_dim
        if not math.isclose(width, round(width), abs_tol=1e-6):
            raise _key_error(source, key, f"{factor!r} x head_dim {head_dim} is not a whole "
                             "number of RoPE dims")
        if first is None:
            first, first_key = round(width), key
        elif round(width) != first:
            raise _key_error(source, key, f"{factor!r} x head_dim {head_dim} = {round(width)} "
                             f"RoPE dims contradicts {first_key!r} ({first} dims)")
    if first is not None:
        values["rope_head_dim"] = first


def _yarn_claim(source: str, key: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """(factor, original_seq_len, beta_fast, beta_slow) of a YaRN dict; None for plain RoPE."""
    kind = _agree(source, [(f"{key}.type", params.get("type")),
                           (f"{key}.rope_type", params.get("rope_type"))])
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise _key_error(source, f"{key}.rope_type", f"{kind!r} is not supported; "
                         "DeepSeek-V4 uses 'yarn' on compressed layers")
    attention_factor = params.get("attention_factor")
    if attention_factor is not None and not _same(attention_factor, 1.0):
        # The reference never multiplies cos/sin by a YaRN mscale.
        raise _key_error(source, f"{key}.attention_factor",
                         f"{attention_factor!r} is not supported; DeepSeek-V4 uses 1.0")
    for name in ("factor", "original_max_position_embeddings"):
        if name not in params:
            raise _key_error(source, f"{key}.{name}", "missing from a YaRN entry")
    return (params["factor"], params["original_max_position_embeddings"],
            params.get("beta_fast", _default("beta_fast")),
            params.get("beta_slow", _default("beta_slow")))


def _check_keys(source: str, key: str, params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _key_error(source, f"{key}.{unknown[0]}", "unknown key in a RoPE entry")


def _read_rope(data: dict[str, Any], values: dict[str, Any], source: str) -> None:
    # (where, yarn tuple or None): every RoPE description in the file must agree.
    yarn_claims: list[tuple[str, tuple[Any, ...] | None]] = []
    scaling = data.get("rope_scaling")
    if scaling is not None:
        scaling = _need_dict(source, "rope_scaling", scaling)
        _check_keys(source, "rope_scaling", scaling, _ROPE_YARN_KEYS - {"rope_theta"})
        yarn_claims.append(("rope_scaling", _yarn_claim(source, "rope_scaling", scaling)))
    params = data.get("rope_parameters")
    if params is not None:
        params = _need_dict(source, "rope_parameters", params)
        if "main" in params or "compress" in params:
            _check_keys(source, "rope_parameters", params, {"main", "compress"})
            _read_nested_rope(params, values, source, yarn_claims)
        else:  # flat, as transformers also accepts: the YaRN of the compressed layers
            _check_keys(source, "rope_parameters", params, _ROPE_YARN_KEYS)
            values["rope_theta"] = _agree(source, [("rope_theta", values.get("rope_theta")),
                                                   ("rope_parameters.rope_theta",
                                                    params.get("rope_theta"))])
            yarn_claims.append(("rope_parameters",
                                _yarn_claim(source, "rope_parameters", params)))
    for key, claim in yarn_claims[1:]:
        if claim != yarn_claims[0][1] and not (
            claim and yarn_claims[0][1] and all(map(_same, claim, yarn_claims[0][1]))
        ):
            raise _key_error(source, key, f"contradicts {yarn_claims[0][0]!r}")
    yarn = yarn_claims[0][1] if yarn_claims else None
    if yarn is None:
        values["original_seq_len"] = 0  # plain RoPE on compressed layers too
    else:
        (values["rope_factor"], values["original_seq_len"],
         values["beta_fast"], values["beta_slow"]) = yarn
    for name in ("rope_theta", "compress_rope_theta"):
        if values.get(name) is None:
            values.pop(name, None)


def _read_nested_rope(params: dict[str, Any], values: dict[str, Any], source: str,
                      yarn_claims: list[tuple[str, tuple[Any, ...] | None]]) -> None:
    main = params.get("main")
    if main is not None:
        main = _need_dict(source, "rope_parameters.main", main)
        _check_keys(source, "rope_parameters.main", main, _ROPE_MAIN_KEYS)
        if _yarn_claim(source, "rope_parameters.main", main) is not None:
            raise _key_error(source, "rope_parameters.main.rope_type",
                             "sliding-window layers use plain RoPE in DeepSeek-V4")
        values["rope_theta"] = _agree(source, [
            ("rope_theta", values.get("rope_theta")),
            ("rope_parameters.main.rope_theta", main.get("rope_theta"))])
    compress = params.get("compress")
    if compress is not None:
        compress = _need_dict(source, "rope_parameters.compress", compress)
        _check_keys(source, "rope_parameters.compress", compress, _ROPE_YARN_KEYS)
        values["compress_rope_theta"] = _agree(source, [
            ("compress_rope_theta", values.get("compress_rope_theta")),
            ("rope_parameters.compress.rope_theta", compress.get("rope_theta"))])
        yarn_claims.append(("rope_parameters.compress",
                            _yarn_claim(source, "rope_parameters.compress", compress)))


def _read_schedule(data: dict[str, Any], values: dict[str, Any], source: str) -> None:
    n_layers = values.get("n_layers", _default("n_layers"))
    n_mtp = values.get("n_mtp_layers", _default("n_mtp_layers"))
    if not (is_int(n_layers) and is_int(n_mtp)):
        return  # validation reports them
    _read_compress_rates(data, source)
    layer_types = data.get("layer_types")
    ratios = values.get("compress_ratios")
    if layer_types is not None:
        layer_types = _need_list(source, "layer_types", layer_types)
        bad = [(i, t) for i, t in enumerate(layer_types) if t not in _HF_RATIO_OF_TYPE]
        if bad:
            raise _key_error(source, "layer_types", f"unknown layer type {bad[0][1]!r} at "
                             f"index {bad[0][0]}; allowed {sorted(_HF_RATIO_OF_TYPE)}")
        if len(layer_types) != n_layers:
            raise _key_error(source, "layer_types", f"has {len(layer_types)} entries, "
                             f"num_hidden_layers is {n_layers}")
        from_types = [_HF_RATIO_OF_TYPE[t] for t in layer_types]
        if ratios is None:
            # transformers drops the MTP slot; both released models use 0 (sliding) there.
            values["compress_ratios"] = from_types + [0] * n_mtp
        elif not isinstance(ratios, list) or ratios[:n_layers] != from_types:
            pairs = enumerate(zip(ratios, from_types)) if isinstance(ratios, list) else ()
            where = next((i for i, (a, b) in pairs if a != b), None)
            at = f" at layer {where}" if where is not None else ""
            raise _key_error(source, "layer_types", f"contradicts 'compress_ratios'{at}")
    elif ratios is None:
        # transformers' fallback schedule differs from the released models' config.json.
        raise ConfigError(f"{source}: key 'compress_ratios': missing (and no 'layer_types'); "
                          "the layer schedule must be given")
    mlp_types = data.get("mlp_layer_types")
    if mlp_types is not None:
        n_hash = _read_mlp_layer_types(mlp_types, n_layers, source)
        values["n_hash_layers"] = _agree(source, [
            ("num_hash_layers", values.get("n_hash_layers")), ("mlp_layer_types", n_hash)])


def _read_compress_rates(data: dict[str, Any], source: str) -> None:
    rates = data.get("compress_rates")
    if rates is not None:
        rates = _need_dict(source, "compress_rates", rates)
        _check_keys(source, "compress_rates", rates, set(_HF_COMPRESS_RATES))
        for name, rate in rates.items():
            if not _same(rate, _HF_COMPRESS_RATES[name]):
                raise _key_error(source, f"compress_rates.{name}", f"{rate!r} is not "
                                 f"supported; DeepSeek-V4 uses {_HF_COMPRESS_RATES[name]}")
    for key, expected in (("compress_rate_csa", 4), ("compress_rate_hca", 128)):
        if key in data and not _same(data[key], expected):
            raise _key_error(source, key, f"{data[key]!r} is not supported; DeepSeek-V4 "
                             f"uses {expected}")


def _read_mlp_layer_types(mlp_types: Any, n_layers: int, source: str) -> int:
    """The number of hash-routed layers; they must be the first ones."""
    mlp_types = _need_list(source, "mlp_layer_types", mlp_types)
    bad = [(i, t) for i, t in enumerate(mlp_types) if t not in ("hash_moe", "moe")]
    if bad:
        raise _key_error(source, "mlp_layer_types", f"unknown MLP type {bad[0][1]!r} at index "
                         f"{bad[0][0]}; allowed 'hash_moe', 'moe'")
    if len(mlp_types) != n_layers:
        raise _key_error(source, "mlp_layer_types", f"has {len(mlp_types)} entries, "
                         f"num_hidden_layers is {n_layers}")
    n_hash = next((i for i, t in enumerate(mlp_types) if t != "hash_moe"), len(mlp_types))
    if "hash_moe" in mlp_types[n_hash:]:
        # The network (like the reference) hash-routes exactly layers 0 .. n_hash_layers-1.
        late = mlp_types.index("hash_moe", n_hash)
        raise _key_error(source, "mlp_layer_types", f"'hash_moe' at index {late} after a "
                         "'moe' layer; hash-routed layers must come first")
    return n_hash


def _read_quantization(data: dict[str, Any], values: dict[str, Any], source: str) -> None:
    top_expert = values.pop("expert_dtype", None)
    qc = data.get("quantization_config")
    if qc is None:
        values["dtype"] = "bf16"
        values["expert_dtype"] = top_expert or "bf16"
        return
    qc = _need_dict(source, "quantization_config", qc)
    # Only what changes how weights are stored is checked; transformers may add bookkeeping.
    for name, expected in (("quant_method", "fp8"), ("fmt", "e4m3"),
                           ("weight_block_size", _QUANT_BLOCK),
                           ("activation_scheme", "dynamic")):
        if name in qc and qc[name] != expected:
            raise _key_error(source, f"quantization_config.{name}", f"{qc[name]!r} is not "
                             f"supported; DeepSeek-V4 uses {expected!r}")
    if "quant_method" not in qc:
        raise _key_error(source, "quantization_config.quant_method", "missing")
    values["dtype"] = "fp8"
    # No scale_fmt: plain fp32 block scales, as in DeepSeek-V3's config (ModelArgs None).
    values["scale_fmt"] = qc.get("scale_fmt")
    # transformers copies the top-level expert_dtype into quantization_config.
    expert = _agree(source, [("expert_dtype", top_expert),
                             ("quantization_config.expert_dtype", qc.get("expert_dtype"))])
    values["expert_dtype"] = expert or "fp8"  # -Base checkpoints: FP8 experts (their config.json)


# ---- writers ----------------------------------------------------------------------------
def _quantization_config(cfg: ModelConfig) -> dict[str, Any]:
    qc: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
    if cfg.scale_fmt is not None:
        qc["scale_fmt"] = cfg.scale_fmt
    qc["weight_block_size"] = list(_QUANT_BLOCK)
    return qc


def _to_official(cfg: ModelConfig) -> dict[str, Any]:
    # Key order as shipped, minus `transformers_version`, which would be a claim
    # about a tool that did not write this file.
    d: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }
    if cfg.expert_dtype != cfg.dtype:
        d["expert_dtype"] = cfg.expert_dtype
    d.update({
        "hc_eps": cfg.hc_eps, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "hidden_size": cfg.dim,
        "index_head_dim": cfg.index_head_dim, "index_n_heads": cfg.index_n_heads,
        "index_topk": cfg.index_topk, "initializer_range": 0.02,
        "max_position_embeddings": cfg.max_seq_len, "model_type": "deepseek_v4",
        "moe_intermediate_size": cfg.moe_inter_dim, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "norm_topk_prob": True,
        "num_attention_heads": cfg.n_heads, "num_experts_per_tok": cfg.n_activated_experts,
        "num_hidden_layers": cfg.n_layers, "num_hash_layers": cfg.n_hash_layers,
        "num_key_value_heads": 1, "num_nextn_predict_layers": cfg.n_mtp_layers,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.rope_head_dim,
    })
    if cfg.dtype == "fp8":
        d["quantization_config"] = _quantization_config(cfg)
    d["rms_norm_eps"] = cfg.norm_eps
    if cfg.original_seq_len:
        d["rope_scaling"] = {
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len, "type": "yarn",
        }
    d.update({
        "rope_theta": cfg.rope_theta, "routed_scaling_factor": cfg.route_scale,
        "scoring_func": cfg.score_func, "sliding_window": cfg.window_size,
        "swiglu_limit": cfg.swiglu_limit, "tie_word_embeddings": False,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": cfg.vocab_size, "compress_rope_theta": cfg.compress_rope_theta,
        "compress_ratios": list(cfg.compress_ratios),
    })
    return d


def _to_inference(cfg: ModelConfig) -> dict[str, Any]:
    d = {key: getattr(cfg, key) for key in _INFERENCE_KEYS}
    d["compress_ratios"] = list(cfg.compress_ratios)
    if cfg.expert_dtype == cfg.dtype:
        d["expert_dtype"] = None  # ModelArgs: experts stored like the other weights
    return d


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    partial = cfg.rope_head_dim / cfg.head_dim
    main = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": partial}
    compress: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta}
    if cfg.original_seq_len:
        compress.update({
            "rope_type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "attention_factor": 1.0,  # the reference applies no YaRN mscale
        })
    compress["partial_rotary_factor"] = partial
    n = cfg.n_layers
    d: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": n,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1,
        "head_dim": cfg.head_dim, "q_lora_rank": cfg.q_lora_rank,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "scoring_func": cfg.score_func, "norm_topk_prob": True,
        "routed_scaling_factor": cfg.route_scale, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "layer_types": [HF_LAYER_TYPES[r] for r in cfg.compress_ratios[:n]],
        "compress_rates": dict(_HF_COMPRESS_RATES),
        "compress_rope_theta": cfg.compress_rope_theta,
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
        "mlp_layer_types": ["hash_moe"] * cfg.n_hash_layers + ["moe"] * (n - cfg.n_hash_layers),
        "swiglu_limit": cfg.swiglu_limit, "sliding_window": cfg.window_size,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk, "num_nextn_predict_layers": cfg.n_mtp_layers,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": False,
        "rope_parameters": {"main": main, "compress": compress},
        "partial_rotary_factor": partial,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    }
    if cfg.expert_dtype != cfg.dtype:
        d["expert_dtype"] = cfg.expert_dtype
    if cfg.dtype == "fp8":
        # transformers folds expert_dtype into the quantization config; write it that way.
        d["quantization_config"] = {**_quantization_config(cfg), "expert_dtype": cfg.expert_dtype}
    if cfg.mtp_compress_ratio:
        # transformers has no field for the MTP slot; the legacy key keeps it (and is ignored
        # by transformers, which takes `layer_types` first).
        d["compress_ratios"] = list(cfg.compress_ratios)
    return d
