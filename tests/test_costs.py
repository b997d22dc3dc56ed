"""Analytic costs: the spec's figures (architecture.md §1, §9) and the network's own count."""

from __future__ import annotations

import importlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.model import costs
from dsv4.model.config import ModelConfig

M = 1 << 20
GIB = 1 << 30
FLASH = ModelConfig.from_preset("v4-flash")
PRO = ModelConfig.from_preset("v4-pro")


def close(value: float, expected: float, rel: float = 0.005) -> bool:
    return abs(value - expected) <= rel * abs(expected)


# ---- parameters (spec §1) ----------------------------------------------------------------
@pytest.mark.parametrize("cfg, total, with_mtp, active, attention, expert", [
    (FLASH, 284.3e9, 290.9e9, 13.3e9, 107e6, 25.2e6),
    (PRO, 1573.0e9, 1598.8e9, 48.9e9, 300e6, 66.1e6),
])
def test_param_counts_reproduce_the_spec(cfg: ModelConfig, total: float, with_mtp: float,
                                         active: float, attention: float,
                                         expert: float) -> None:
    p = costs.param_counts(cfg)
    assert close(p["total"], total)
    assert close(p["total_with_mtp"], with_mtp)
    assert close(p["active"], active)
    assert close(p["attention_core_per_layer"], attention)
    assert close(p["routed_expert"], expert)
    assert p["total_with_mtp"] == p["total"] + p["mtp"]


def test_pro_matches_the_measured_shard_total() -> None:
    # spec §1: the Pro shards hold 1598.84B parameters; our count must agree to 0.01%.
    assert close(costs.param_counts(PRO)["total_with_mtp"], 1598.84e9, rel=1e-4)


def test_shapes_from_the_checkpoint_headers() -> None:
    # spec §14.2 Flash: wq_a [1024, 4096], wq_b [32768, 1024], wkv [512, 4096],
    # wo_a [8192, 4096], wo_b [4096, 8192]; compressor wkv/wgate CSA [1024, d], HCA [512, d].
    core = 1024 * 4096 + 1024 + 32768 * 1024 + 512 * 4096 + 512 + 8192 * 4096 + 4096 * 8192 + 64
    assert costs.attention_core_params(FLASH) == core
    assert costs.compressor_params(FLASH, 4, 512) == 2 * 1024 * 4096 + 4 * 1024 + 512
    assert costs.compressor_params(FLASH, 128, 512) == 2 * 512 * 4096 + 128 * 512 + 512
    assert costs.indexer_params(FLASH) == (64 * 128 * 1024 + 64 * 4096
                                           + 2 * 256 * 4096 + 4 * 256 + 128)
    assert costs.mhc_block_params(FLASH) == 2 * (24 * 16384 + 24 + 3)
    assert costs.expert_params(FLASH) == 3 * 2048 * 4096


def test_hash_layers_have_tables_not_bias() -> None:
    p = costs.param_counts(FLASH)
    assert p["buffers"] == 3 * 129280 * 6
    assert (costs.router_params(FLASH, hash_routed=False)
            - costs.router_params(FLASH, hash_routed=True)) == 256


# ---- KV cache (spec §9) --------------------------------------------------------------------
def test_entry_layouts() -> None:
    fp8, bf16 = costs.fp8_layout(FLASH), costs.bf16_layout(FLASH)
    assert (fp8.main_entry, fp8.indexer_entry) == (584, 68)
    assert (bf16.main_entry, bf16.indexer_entry) == (1024, 256)
    nano = costs.fp8_layout(ModelConfig.from_preset("nano"))  # head 128 (rope 64), index 64
    assert (nano.main_entry, nano.indexer_entry) == (64 + 128 + 1 + 1, 32 + 2)
    assert costs.v32_bytes_per_token("fp8") == 48_068
    assert costs.v32_bytes_per_token("bf16") == 85_888


@pytest.mark.parametrize("cfg, per_token, ratio, gib", [
    (FLASH, 3514.3, 0.073, 3.43),
    (PRO, 5031.4, 0.105, 4.92),
])
def test_kv_bytes_at_1m_reproduce_the_spec(cfg: ModelConfig, per_token: float, ratio: float,
                                           gib: float) -> None:
    kv = costs.kv_cache_bytes(cfg, M)
    assert close(kv["asymptotic_bytes_per_token"], per_token, rel=1e-4)
    assert close(kv["bytes_per_token"], per_token)
    assert round(kv["ratio_vs_v32"], 3) == ratio
    assert round(kv["total_bytes"] / GIB, 2) == gib
    assert kv["window_bytes"] == cfg.n_layers * 128 * 584  # "+3.2 MB of windows" for Flash
    assert kv["v32_total_bytes"] == 48_068 * M  # 46.9 GiB
    assert round(kv["v32_total_bytes"] / GIB, 1) == 46.9


def test_bf16_accounting_of_pro() -> None:
    kv = costs.kv_cache_bytes(PRO, M, layout="bf16")
    assert kv["asymptotic_bytes_per_token"] == 9848
    assert round((kv["total_bytes"] - kv["window_bytes"]) / GIB, 2) == 9.62
    assert round(kv["v32_total_bytes"] / GIB, 1) == 83.9


def test_kv_formula_by_hand() -> None:
    cfg = ModelConfig.from_preset("nano")  # 1 sliding, 2 CSA, 1 HCA; entries 194 B / 34 B
    t = 1000
    kv = costs.kv_cache_bytes(cfg, t)
    assert kv["window_bytes"] == 4 * 128 * 194
    assert kv["csa_main_bytes"] == 2 * 250 * 194
    assert kv["csa_indexer_bytes"] == 2 * 250 * 34
    assert kv["hca_bytes"] == 1 * 7 * 194  # floor(1000 / 128) = 7 entries
    assert kv["total_bytes"] == 4 * 128 * 194 + 2 * 250 * (194 + 34) + 7 * 194
    assert kv["bytes_per_token"] == kv["total_bytes"] / t


def test_compressor_state_bytes() -> None:
    # spec §9.1, fp32 kv and gate rows: CSA [8, 1024], indexer [8, 256], HCA [128, 512].
    per_csa = 2 * 8 * 1024 * 4 + 2 * 8 * 256 * 4
    per_hca = 2 * 128 * 512 * 4
    assert costs.compressor_state_bytes(FLASH) == 21 * per_csa + 20 * per_hca
    assert costs.kv_cache_bytes(FLASH, M)["compressor_state_bytes"] == 21 * per_csa + 20 * per_hca


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_kv_rejects_bad_context(bad: object) -> None:
    with pytest.raises(ValueError, match="context"):
        costs.kv_cache_bytes(FLASH, bad)  # type: ignore[arg-type]


def test_kv_rejects_unknown_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        costs.kv_cache_bytes(FLASH, 1024, layout="int4")


# ---- FLOPs (spec §9.4) ---------------------------------------------------------------------
def test_decode_flops_reproduce_the_spec_estimate() -> None:
    pro, flash = costs.decode_flops_per_token(PRO, M), costs.decode_flops_per_token(FLASH, M)
    assert close(pro["total"], 304e9, rel=0.01)
    assert close(flash["total"], 140e9, rel=0.01)
    assert close(pro["v32_total"], 1157e9, rel=0.01)
    assert round(pro["ratio_vs_v32"], 2) == 0.26
    assert round(flash["ratio_vs_v32"], 2) == 0.12


# ---- purity --------------------------------------------------------------------------------
def test_costs_do_not_import_torch() -> None:
    code = ("import sys; import dsv4.model.costs as c; from dsv4.model.config import ModelConfig; "
            "c.param_counts(ModelConfig.from_preset('v4-pro')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---- the network itself ------------------------------------------------------------------------
def _transformer_class():
    torch = pytest.importorskip("torch")
    try:
        module = importlib.import_module("dsv4.model.network")
    except ModuleNotFoundError as err:
        if err.name == "dsv4.model.network":
            pytest.skip("dsv4/model/network.py is not written yet")
        raise
    if not hasattr(module, "Transformer"):
        pytest.skip("dsv4.model.network has no Transformer yet")
    return torch, module.Transformer


def _meta_model(preset: str):
    torch, transformer = _transformer_class()
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        return cfg, transformer(cfg)


def _is_hash_table(name: str) -> bool:
    return name.endswith("tid2eid")


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_network_parameter_count_matches(preset: str) -> None:
    cfg, model = _meta_model(preset)
    named = {n: p.numel() for n, p in model.named_parameters() if not _is_hash_table(n)}
    main = sum(v for n, v in named.items() if not n.startswith("mtp."))
    expected = costs.param_counts(cfg)
    per_layer = {
        i: (sum(v for n, v in named.items() if n.startswith(f"layers.{i}.")),
            costs.block_params(cfg, cfg.compress_ratios[i], i < cfg.n_hash_layers))
        for i in range(cfg.n_layers)
    }
    wrong = {i: got_want for i, got_want in per_layer.items() if got_want[0] != got_want[1]}
    assert not wrong, f"layers whose (network, analytic) counts differ: {wrong}"
    assert main == expected["total"]


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_network_mtp_and_hash_tables_match(preset: str) -> None:
    cfg, model = _meta_model(preset)
    named = dict(model.named_parameters())
    mtp = sum(p.numel() for n, p in named.items() if n.startswith("mtp."))
    if mtp == 0:
        pytest.skip("the network has no MTP block yet")
    assert mtp == costs.param_counts(cfg)["mtp"]
    # tid2eid may be a buffer or a frozen parameter; either way there is one table per hash layer
    tables = sum(t.numel() for n, t in itertools.chain(model.named_parameters(),
                                                       model.named_buffers())
                 if _is_hash_table(n))
    assert tables == costs.param_counts(cfg)["buffers"]
