"""`dsv4` command line: run in-process through `main`, plus one real `python -m dsv4`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.cli import main
from dsv4.commands import format_bytes, format_count
from dsv4.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_table_for_flash(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "--preset", "v4-flash")
    assert code == 0 and err == ""
    for expected in ("284.33 B", "290.94 B", "13.27 B",  # total, incl. MTP, active
                     "2 sliding, 21 CSA, 20 HCA", "1,048,576 tokens",
                     "584 B / 68 B", "1024 B / 256 B", "3514.2 B", "48,068 B", "7.32%",
                     "3.43 GiB", "compressor state"):
        assert expected in out, expected


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "--preset", "v4-pro", "--context", "1048576", "--json")
    assert code == 0
    report = json.loads(out)
    assert round(report["total_params"] / 1e9, 1) == 1573.0
    assert round(report["active_params"] / 1e9, 1) == 48.9
    assert round(report["kv_bytes_per_token"]) == 5036  # 5031.4 + the fixed windows / T
    assert report["kv_bytes_per_token_v32"] == 48_068
    assert round(report["kv_ratio_vs_v32"], 3) == 0.105
    assert report["layers"] == {"sliding": 0, "csa": 30, "hca": 31, "hash_moe": 3, "mtp": 1}
    assert report["kv_cache"]["bf16"]["asymptotic_bytes_per_token"] == 9848
    assert report["context"] == 1_048_576


def test_info_context_changes_kv(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "info", "--preset", "nano", "--context", "4096", "--json")
    report = json.loads(out)
    assert report["context"] == 4096
    assert report["kv_cache"]["fp8"]["total_bytes"] == 4 * 128 * 194 + 2 * 1024 * 228 + 32 * 194


def test_info_from_config_file_and_folder(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ModelConfig.from_preset("small").save(tmp_path, dialect="hf")
    code, by_folder, _ = run(capsys, "info", "--config", str(tmp_path), "--json")
    assert code == 0
    _, by_preset, _ = run(capsys, "info", "--preset", "small", "--json")
    folder, preset = json.loads(by_folder), json.loads(by_preset)
    assert folder["config"] == str(tmp_path)
    assert folder["params"] == preset["params"] and folder["kv_cache"] == preset["kv_cache"]
    code, out, _ = run(capsys, "info", "--config", str(tmp_path / "config.json"))
    assert code == 0 and str(tmp_path / "config.json") in out.splitlines()[0]


@pytest.mark.parametrize("argv, message", [
    (["info", "--preset", "v5"], "unknown preset 'v5'"),
    (["info", "--config", "/nonexistent/config.json"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("dsv4 info: error:")


def test_bad_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{\"hidden_size\": ")
    code, _, err = run(capsys, "info", "--config", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "not valid JSON" in err


def test_invalid_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ModelConfig.from_preset("nano").to_official_dict() | {"o_groups": 3}
    (tmp_path / "config.json").write_text(json.dumps(data))
    code, _, err = run(capsys, "info", "--config", str(tmp_path))
    assert code == 2 and "'o_groups'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    [],
    ["info"],
    ["info", "--preset", "nano", "--config", "x.json"],
    ["info", "--preset", "nano", "--context", "0"],
    ["info", "--preset", "nano", "--context", "lots"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["info", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--preset", "--config", "--context", "--json", "v4-flash"):
        assert option in out


def test_formatting() -> None:
    assert format_count(284_332_240_471) == "284.33 B"
    assert format_count(6_942_277) == "6.94 M"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(584) == "584 B"


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_python_m_dsv4_info_json() -> None:
    done = _python("-m", "dsv4", "info", "--preset", "v4-pro", "--context", "1048576", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"total_params", "active_params", "kv_bytes_per_token", "kv_bytes_per_token_v32",
            "kv_ratio_vs_v32"} <= report.keys()
    assert round(report["total_params_with_mtp"] / 1e9, 1) == 1598.8


def test_info_does_not_import_torch() -> None:
    code = ("import sys; from dsv4.cli import main; "
            "assert main(['info', '--preset', 'nano', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr


def test_tokenizer_option_replaces_the_checkpoint_tokenizer(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    import argparse

    from dsv4.commands import CommandError, load_inference_model
    from dsv4.text.tokenizer import byte_tokenizer

    byte_tokenizer().save(tmp_path / "tokenizer.json")
    args = argparse.Namespace(checkpoint=None, preset="nano", config=None, random=True, seed=0,
                              threads=None, device="cpu", dtype="fp32", tokenizer=str(tmp_path))
    _, tokenizer, _ = load_inference_model(args)
    assert tokenizer.hf.to_str() == byte_tokenizer().hf.to_str()
    assert "byte-level tokenizer" not in capsys.readouterr().err
    args.tokenizer = str(tmp_path / "missing.json")
    with pytest.raises(CommandError, match=r"--tokenizer .*missing\.json: no such file"):
        load_inference_model(args)


def test_public_import_paths() -> None:
    from dsv4 import ModelConfig, Transformer, load, save  # noqa: F401
    from dsv4.engine import Engine, SamplingParams
    from dsv4.inference import engine
    from dsv4.model import Transformer as network_transformer

    assert Engine is engine.Engine and SamplingParams is engine.SamplingParams
    assert Transformer is network_transformer


def test_nothing_imports_the_dispatcher() -> None:
    """dsv4.cli only dispatches: the command modules share dsv4.commands, never dsv4.cli."""
    import ast

    root = Path(__file__).resolve().parents[1] / "dsv4"
    for path in root.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert "dsv4.cli" not in names, f"{path} imports dsv4.cli"
