"""`dsv4 convert` and `dsv4 info CHECKPOINT`, on real checkpoint folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import dsv4
from dsv4.cli import main
from dsv4.model import quant
from dsv4.model.network import Transformer
from dsv4.text.tokenizer import byte_tokenizer
from dsv4.weights import checkpoint
from tests.parity_utils import randomize, tiny_config


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official FP8 / FP4 checkpoint with a tokenizer, sharded."""
    model = randomize(Transformer(tiny_config()), seed=5).eval()
    folder = tmp_path_factory.mktemp("src") / "official"
    return dsv4.save(model, folder, format="official", dtype="fp8", expert_dtype="fp4",
                     tokenizer=byte_tokenizer(), max_shard_bytes=80_000)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def states_equal(a: Path, b: Path) -> None:
    sa, sb = dsv4.load(a, dtype="fp32").state_dict(), dsv4.load(b, dtype="fp32").state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("to", ["native", "hf", "official"])
def test_convert_to_each_layout(tmp_path: Path, official: Path, to: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / to
    code, out, err = run(capsys, "convert", str(official), str(dst), "--to", to)
    assert code == 0, err
    assert out.startswith(f"wrote {to} checkpoint {dst}")
    assert checkpoint.plan(dst).format == to
    assert (dst / "tokenizer.json").is_file()
    states_equal(official, dst)  # lossless: official values dequantize exactly into bf16


def test_convert_dtype_and_shards(tmp_path: Path, official: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "n32"
    code, _, err = run(capsys, "convert", str(official), str(dst), "--to", "native",
                       "--dtype", "fp32", "--max-shard-size", "100KB")
    assert code == 0, err
    assert (dst / checkpoint.INDEX_NAME).is_file()
    assert all(t.dtype in (torch.float32, torch.int64)
               for t in dsv4.load(dst).state_dict().values())
    back = tmp_path / "bf16-official"
    code, _, err = run(capsys, "convert", str(dst), str(back), "--to", "official",
                       "--dtype", "bf16", "--expert-dtype", "bf16")
    assert code == 0, err
    cfg = checkpoint.plan(back).config
    assert (cfg.dtype, cfg.expert_dtype) == ("bf16", "bf16")
    states_equal(official, back)


def test_fp4_to_fp8_recast_is_lossless_and_streams(tmp_path: Path, official: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "fp8"
    code, _, err = run(capsys, "convert", str(official), str(dst), "--to", "official",
                       "--expert-dtype", "fp8")
    assert code == 0, err
    assert checkpoint.plan(dst).config.expert_dtype == "fp8"
    before = {}
    for f in official.glob("*.safetensors"):
        before |= safetensors.torch.load_file(f)
    after = safetensors.torch.load_file(dst / "model.safetensors")
    assert before.keys() == after.keys()
    for name, t in before.items():
        if ".experts." in name:
            continue
        assert t.dtype == after[name].dtype and torch.equal(
            t.view(torch.uint8) if t.element_size() == 1 else t,
            after[name].view(torch.uint8) if t.element_size() == 1 else after[name]), name
    w = "layers.2.ffn.experts.5.w2"
    assert after[f"{w}.weight"].dtype == torch.float8_e4m3fn
    assert after[f"{w}.scale"].shape == (1, 1)
    exact = quant.dequantize_fp4(before[f"{w}.weight"], before[f"{w}.scale"], 32)
    assert torch.equal(quant.dequantize_fp8(after[f"{w}.weight"], after[f"{w}.scale"]), exact)
    states_equal(official, dst)


def test_info_on_checkpoints(tmp_path: Path, official: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", str(official))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"Checkpoint {official}"
    assert "official" in lines[1] and "fp8, routed experts fp4" in out
    assert "F8_E4M3" in out and "F8_E8M0" in out and "I8" in out
    assert "DeepSeek-V4 configuration" in out  # the config report follows
    code, out, _ = run(capsys, "info", str(official), "--json")
    report = json.loads(out)
    ckpt = report["checkpoint"]
    assert ckpt["format"] == "official" and ckpt["tensors"] > 400
    model = Transformer(tiny_config())
    n_params = sum(p.numel() for p in model.parameters())
    assert ckpt["params"]["total"] == n_params
    assert ckpt["params"]["mtp"] == sum(p.numel() for p in model.mtp.parameters())
    assert ckpt["params"]["buffers"] == 2 * 160 * 2  # two hash layers, [vocab, k]
    assert report["total_params"] == ckpt["params"]["main"]  # the analytic count agrees


def test_info_on_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Transformer(tiny_config())
    folder = checkpoint.save_to_run(model, tmp_path / "run", 7)
    code, out, _ = run(capsys, "info", str(tmp_path / "run"))
    assert code == 0 and out.splitlines()[0] == f"Checkpoint {folder}"
    assert "native" in out.splitlines()[1]


def test_info_broken_checkpoint_is_one_line_exit_2(tmp_path: Path, official: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    dsv4.save(dsv4.load(official), broken, format="official", max_shard_bytes=80_000)
    index = json.loads((broken / checkpoint.INDEX_NAME).read_text())
    shard = broken / index["weight_map"]["layers.3.attn.wq_b.weight"]
    shard.write_bytes(shard.read_bytes()[:-10])
    code, out, err = run(capsys, "info", str(broken))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dsv4 info: error:")
    assert shard.name in err and "truncated" in err and "tensor '" in err
    code, _, err = run(capsys, "convert", str(broken), str(tmp_path / "x"), "--to", "hf")
    assert code == 2 and shard.name in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [
    ["info", "somewhere", "--preset", "nano"],
    ["convert", "a", "b"],
    ["convert", "a", "b", "--to", "gguf"],
    ["convert", "a", "b", "--to", "hf", "--max-shard-size", "lots"],
])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_bad_dtype_for_layout(tmp_path: Path, official: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "convert", str(official), str(tmp_path / "x"), "--to",
                       "official", "--dtype", "fp32")
    assert code == 2 and "dtype='fp32'" in err
    code, _, err = run(capsys, "convert", str(official), str(tmp_path / "y"), "--to", "hf",
                       "--expert-dtype", "fp4")
    assert code == 2 and "official format only" in err


@pytest.mark.slow
def test_convert_in_a_real_process(tmp_path: Path, official: Path) -> None:
    dst = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "dsv4", "convert", str(official), str(dst),
                           "--to", "hf", "--dtype", "bf16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    done = subprocess.run([sys.executable, "-m", "dsv4", "info", str(dst), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoint"]["format"] == "hf"
