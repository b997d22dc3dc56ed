"""ModelConfig: validation, presets, and the three JSON dialects (official, inference, hf)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest

from dsv4.model import config as config_module
from dsv4.model.config import PRESETS, ConfigError, ModelConfig, detect_dialect

# spec architecture.md §15.1, verbatim values in shipped key order
FLASH_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1,
    "expert_dtype": "fp4",
    "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096,
    "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512,
    "initializer_range": 0.02, "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4", "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43,
    "num_hash_layers": 3, "num_key_value_heads": 1, "num_nextn_predict_layers": 1,
    "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                     "original_max_position_embeddings": 65536, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "sliding_window": 128, "swiglu_limit": 10.0, "tie_word_embeddings": False,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.57.1",
    "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128,
                        4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128,
                        4, 128, 4, 128, 4, 128, 4, 0],
}
# spec §15.2: identical to Flash except these
PRO_CONFIG = {
    **FLASH_CONFIG,
    "hidden_size": 7168, "index_topk": 1024, "moe_intermediate_size": 3072,
    "n_routed_experts": 384, "num_attention_heads": 128, "num_hidden_layers": 61,
    "o_groups": 16, "q_lora_rank": 1536, "routed_scaling_factor": 2.5,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}
# spec §15.3, Flash inference/config.json (the third-party copy, with its extra key)
FLASH_INFERENCE_CONFIG = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43,
    "n_hash_layers": 3, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 6, "score_func": "sqrtsoftplus", "route_scale": 1.5,
    "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512, "rope_head_dim": 64,
    "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "original_seq_len": 65536,
    "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
    "compress_rope_theta": 160000, "compress_ratios": FLASH_CONFIG["compress_ratios"],
    "n_routed_experts_score": 128,
}

DIALECTS = ("official", "inference", "hf")


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# ---- presets and validation ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name: str) -> None:
    cfg = ModelConfig.from_preset(name)
    assert len(cfg.compress_ratios) == cfg.n_layers + cfg.n_mtp_layers


def test_flash_and_pro_layer_schedule() -> None:
    flash, pro = ModelConfig.from_preset("v4-flash"), ModelConfig.from_preset("v4-pro")
    assert [flash.layer_kinds.count(k) for k in ("sliding", "csa", "hca")] == [2, 21, 20]
    assert [pro.layer_kinds.count(k) for k in ("sliding", "csa", "hca")] == [0, 30, 31]
    assert flash.mtp_compress_ratio == pro.mtp_compress_ratio == 0


@pytest.mark.parametrize("changes, field", [
    (dict(compress_ratios=[0, 4, 128, 4]), "compress_ratios"),  # length n_layers, MTP slot missing
    (dict(compress_ratios=[0, 8, 128, 4, 0]), "compress_ratios"),  # unknown layer type 8
    (dict(compress_ratios=[0, "4", 128, 4, 0]), "compress_ratios"),
    (dict(compress_ratios=4), "compress_ratios"),
    (dict(o_groups=3), "o_groups"),  # does not divide n_heads=4
    (dict(rope_head_dim=31), "rope_head_dim"),  # odd
    (dict(rope_head_dim=66, head_dim=64), "rope_head_dim"),  # > head_dim
    (dict(n_activated_experts=9), "n_activated_experts"),  # > n_routed_experts=8
    (dict(index_topk=65536 // 4 + 1), "index_topk"),  # more than the CSA entries at max_seq_len
    (dict(dim=0), "dim"),
    (dict(dim=True), "dim"),
    (dict(rope_theta="big"), "rope_theta"),
    (dict(eos_token_id=[1, 2]), "eos_token_id"),
    (dict(bos_token_id=4096), "bos_token_id"),
    (dict(scale_fmt="e5m2"), "scale_fmt"),
    (dict(n_hash_layers=5), "n_hash_layers"),
    (dict(n_mtp_layers=2, compress_ratios=[0, 4, 128, 4, 0, 0]), "n_mtp_layers"),
])
def test_invalid_config_names_the_field(changes: dict, field: str) -> None:
    base = ModelConfig.from_preset("nano")
    with pytest.raises(ConfigError, match=field) as info:
        base.replace(**changes)
    assert info.value.field == field


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'v5'"):
        ModelConfig.from_preset("v5")


def test_from_dict_rejects_unknown_keys() -> None:
    data = ModelConfig.from_preset("nano").to_dict() | {"n_experts": 8}
    with pytest.raises(ConfigError, match="n_experts"):
        ModelConfig.from_dict(data)


def test_to_dict_from_dict_round_trip() -> None:
    cfg = ModelConfig.from_preset("small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---- reading the released configs -----------------------------------------------------------
def test_verbatim_flash_config_is_the_flash_preset(tmp_path: Path) -> None:
    assert detect_dialect(FLASH_CONFIG) == "official"
    assert ModelConfig.from_config_dict(FLASH_CONFIG) == ModelConfig.from_preset("v4-flash")
    _write(tmp_path / "config.json", FLASH_CONFIG)
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_preset("v4-flash")  # a folder


def test_pro_config_is_the_pro_preset() -> None:
    assert ModelConfig.from_config_dict(PRO_CONFIG) == ModelConfig.from_preset("v4-pro")


def test_flash_inference_config_is_the_flash_preset() -> None:
    assert detect_dialect(FLASH_INFERENCE_CONFIG) == "inference"
    cfg = ModelConfig.from_config_dict(FLASH_INFERENCE_CONFIG)
    assert cfg == ModelConfig.from_preset("v4-flash")


def test_inference_config_defaults_for_unlisted_fields() -> None:
    data = {k: v for k, v in FLASH_INFERENCE_CONFIG.items() if k != "expert_dtype"}
    cfg = ModelConfig.from_config_dict(data)
    assert (cfg.norm_eps, cfg.hc_eps, cfg.n_mtp_layers) == (1e-6, 1e-6, 1)
    assert cfg.expert_dtype == "fp8"  # ModelArgs: no expert_dtype = stored like the rest


def test_official_writer_reproduces_the_shipped_file() -> None:
    written = ModelConfig.from_preset("v4-flash").to_official_dict()
    shipped = {k: v for k, v in FLASH_CONFIG.items() if k != "transformers_version"}
    assert written == shipped
    assert list(written) == list(shipped)  # same key order


def test_inference_writer_is_loadable_by_modelargs_keys() -> None:
    written = ModelConfig.from_preset("v4-flash").to_inference_dict()
    expected = {k: v for k, v in FLASH_INFERENCE_CONFIG.items() if k != "n_routed_experts_score"}
    assert {k: written[k] for k in expected} == expected
    # Only reference ModelArgs field names: the official code builds ModelArgs(**json).
    assert set(written) - set(expected) == {"norm_eps", "hc_eps", "n_mtp_layers", "max_seq_len"}


# ---- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_every_dialect(tmp_path: Path, name: str,
                                                        dialect: str) -> None:
    cfg = ModelConfig.from_preset(name)
    path = cfg.save(tmp_path, dialect=dialect)
    assert path == tmp_path / "config.json"
    assert detect_dialect(json.loads(path.read_text())) == dialect
    assert ModelConfig.from_file(path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left


@pytest.mark.parametrize("dialect", DIALECTS)
def test_round_trip_of_non_default_values(tmp_path: Path, dialect: str) -> None:
    cfg = ModelConfig.from_preset("nano").replace(
        dtype="fp8", expert_dtype="fp4", scale_fmt=None, n_hash_layers=0, window_size=64,
        compress_ratios=[128, 4, 4, 0, 128], score_func="sigmoid", max_seq_len=131072,
    )
    assert ModelConfig.from_file(cfg.save(tmp_path / "c.json", dialect)) == cfg


def test_what_each_dialect_loses() -> None:
    # Documented in config.py: quant_sim is carried by no dialect, bos/eos not by inference.
    cfg = ModelConfig.from_preset("nano").replace(quant_sim=True, bos_token_id=5, eos_token_id=6)
    for dialect in DIALECTS:
        back = ModelConfig.from_config_dict(getattr(cfg, f"to_{dialect}_dict")())
        assert back.quant_sim is False
        assert (back.bos_token_id, back.eos_token_id) == ((0, 1) if dialect == "inference"
                                                          else (5, 6))


def test_hf_dialect_without_compress_ratios_gives_mtp_slot_zero() -> None:
    cfg = ModelConfig.from_preset("nano").replace(compress_ratios=[0, 4, 128, 4, 128])
    data = cfg.to_hf_dict()
    assert data["compress_ratios"] == [0, 4, 128, 4, 128]  # kept when it is not 0
    assert ModelConfig.from_config_dict(data) == cfg
    del data["compress_ratios"]
    assert ModelConfig.from_config_dict(data).compress_ratios == [0, 4, 128, 4, 0]
    assert "compress_ratios" not in ModelConfig.from_preset("nano").to_hf_dict()


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ModelConfig.from_preset("nano").save(tmp_path / "config.json")
    before = path.read_text()

    def broken_dump(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(config_module.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        ModelConfig.from_preset("small").save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_save_rejects_unknown_dialect(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dialect='gguf'"):
        ModelConfig.from_preset("nano").save(tmp_path, dialect="gguf")


# ---- transformers DeepseekV4Config ------------------------------------------------------------
def _hf_config_class():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "DeepseekV4Config", None)
    if cls is None:
        pytest.skip("this transformers has no DeepseekV4Config")
    return cls


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_builds_the_same_transformers_config(tmp_path: Path, name: str) -> None:
    config_cls = _hf_config_class()
    cfg = ModelConfig.from_preset(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = config_cls(**cfg.to_hf_dict())
    assert hf.num_hidden_layers == cfg.n_layers and hf.hidden_size == cfg.dim
    assert hf.head_dim == cfg.head_dim and hf.qk_rope_head_dim == cfg.rope_head_dim
    assert hf.partial_rotary_factor == cfg.rope_head_dim / cfg.head_dim
    expected_types = [config_module.HF_LAYER_TYPES[r] for r in cfg.compress_ratios[:cfg.n_layers]]
    assert hf.layer_types == expected_types
    assert hf.mlp_layer_types == (["hash_moe"] * cfg.n_hash_layers
                                  + ["moe"] * (cfg.n_layers - cfg.n_hash_layers))
    assert hf.compress_rates == {"compressed_sparse_attention": 4,
                                 "heavily_compressed_attention": 128}
    main, compress = hf.rope_parameters["main"], hf.rope_parameters["compress"]
    assert main["rope_type"] == "default" and main["rope_theta"] == cfg.rope_theta
    assert compress["rope_type"] == "yarn" and compress["rope_theta"] == cfg.compress_rope_theta
    assert compress["factor"] == cfg.rope_factor
    assert compress["original_max_position_embeddings"] == cfg.original_seq_len
    assert compress["attention_factor"] == 1.0
    assert (hf.sliding_window, hf.o_groups, hf.o_lora_rank) == (cfg.window_size, cfg.o_groups,
                                                                cfg.o_lora_rank)
    assert (hf.index_n_heads, hf.index_head_dim, hf.index_topk) == (
        cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk)
    assert (hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (
        cfg.n_routed_experts, cfg.n_activated_experts, cfg.moe_inter_dim)
    assert hf.routed_scaling_factor == cfg.route_scale
    assert hf.num_nextn_predict_layers == cfg.n_mtp_layers
    # What save_pretrained writes reads back to the same ModelConfig.
    hf.save_pretrained(tmp_path)
    assert detect_dialect(json.loads((tmp_path / "config.json").read_text())) == "hf"
    assert ModelConfig.from_file(tmp_path) == cfg


def test_transformers_rewrite_of_the_official_flash_config(tmp_path: Path) -> None:
    config_cls = _hf_config_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config_cls(**copy.deepcopy(FLASH_CONFIG)).save_pretrained(tmp_path)
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_preset("v4-flash")


# ---- bad files -----------------------------------------------------------------------------
def _flash_with(**changes: object) -> dict:
    data = copy.deepcopy(FLASH_CONFIG)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


HF_NANO = ModelConfig.from_preset("nano").to_hf_dict()


@pytest.mark.parametrize("data, key", [
    (_flash_with(compress_ratios=FLASH_CONFIG["compress_ratios"][:-1]), "compress_ratios"),
    (_flash_with(compress_ratios=[8] + FLASH_CONFIG["compress_ratios"][1:]), "compress_ratios"),
    (_flash_with(hidden_size=0), "hidden_size"),
    (_flash_with(num_experts_per_tok=300), "num_experts_per_tok"),
    (_flash_with(index_topk=10**7), "index_topk"),
    (_flash_with(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (_flash_with(o_groups=7), "o_groups"),
    (_flash_with(num_hidden_layers=42), "compress_ratios"),  # 44 entries now too many
    (_flash_with(moe_layer_freq=1), "moe_layer_freq"),  # unknown key
    (_flash_with(num_key_value_heads=8), "num_key_value_heads"),
    (_flash_with(norm_topk_prob=False), "norm_topk_prob"),
    (_flash_with(tie_word_embeddings=True), "tie_word_embeddings"),
    (_flash_with(rope_scaling={"type": "linear", "factor": 4}), "rope_scaling.rope_type"),
    (_flash_with(rope_scaling={"type": "yarn", "factor": 16}),
     "rope_scaling.original_max_position_embeddings"),
    (_flash_with(rope_scaling={**FLASH_CONFIG["rope_scaling"], "mscale": 1.0}),
     "rope_scaling.mscale"),
    (_flash_with(quantization_config={"quant_method": "gptq"}), "quantization_config.quant_method"),
    (_flash_with(compress_ratios=None), "compress_ratios"),  # no schedule at all
    (_flash_with(layer_types=["sliding_attention"] * 43), "layer_types"),  # contradicts ratios
    (_flash_with(partial_rotary_factor=0.25), "partial_rotary_factor"),  # contradicts 64/512
    (_flash_with(mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 41), "mlp_layer_types"),  # vs 3
    (_flash_with(dim=4096), "dim"),  # mixes dialects
    ({**HF_NANO, "mlp_layer_types": ["hash_moe", "moe", "hash_moe", "moe"]}, "mlp_layer_types"),
    ({**HF_NANO, "mlp_layer_types": ["dense", "moe", "moe", "moe"]}, "mlp_layer_types"),
    ({**HF_NANO, "layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({**HF_NANO, "layer_types": ["full_attention"] * 4}, "layer_types"),
    ({**HF_NANO, "compress_rates": {"compressed_sparse_attention": 8,
                                    "heavily_compressed_attention": 128}},
     "compress_rates.compressed_sparse_attention"),
    ({**HF_NANO, "compress_rope_theta": 40000}, "rope_parameters.compress.rope_theta"),
    ({**HF_NANO, "rope_parameters": {**HF_NANO["rope_parameters"], "full": {}}},
     "rope_parameters.full"),
    ({**FLASH_INFERENCE_CONFIG, "kv_lora_rank": 512}, "kv_lora_rank"),
    ({**FLASH_INFERENCE_CONFIG, "n_layers": 42}, "compress_ratios"),
])
def test_bad_config_file_names_file_and_key(tmp_path: Path, data: dict, key: str) -> None:
    path = _write(tmp_path / "config.json", data)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_file(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert repr(key) in message, message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="config.json: no such file"):
        ModelConfig.from_file(tmp_path)  # a folder without config.json
    (tmp_path / "bad.json").write_text("{\"dim\": 4")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        ModelConfig.from_file(tmp_path / "bad.json")
    _write(tmp_path / "list.json", [1, 2])
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_file(tmp_path / "list.json")
    _write(tmp_path / "other.json", {"n_embd": 768})
    with pytest.raises(ConfigError, match="not a DeepSeek-V4 config"):
        ModelConfig.from_file(tmp_path / "other.json")
