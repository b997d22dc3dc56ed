"""`dsv4 generate` and `dsv4 chat`: random presets, saved checkpoints, bad input."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.inference.engine import Engine, SamplingParams
from dsv4.model.config import ModelConfig
from dsv4.model.network import Transformer
from dsv4.text.tokenizer import byte_tokenizer
from tests.parity_utils import randomize, tiny_config

NANO = ["--preset", "nano", "--random", "--threads", "1"]


def test_generate_ids_equal_the_engine_greedy_output(capsys) -> None:
    assert main(["generate", *NANO, "--ids", "5 6 7 8", "--temperature", "0",
                 "--max-tokens", "6", "--dtype", "fp32"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    model = Transformer(ModelConfig.from_preset("nano"))
    model.init_weights(seed=0)
    expected = Engine(model, max_batch=1, capacity=64).generate(
        [[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6))[0]
    assert printed == expected


@pytest.mark.slow
def test_generate_streams_text_from_a_saved_checkpoint(tmp_path) -> None:
    """A real checkpoint folder with its tokenizer, a real process, the prompt on stdin."""
    model = randomize(Transformer(tiny_config(vocab_size=300)), seed=1)
    dsv4.save(model, tmp_path / "ckpt", tokenizer=byte_tokenizer())
    result = subprocess.run(
        [sys.executable, "-m", "dsv4", "generate", "--run", str(tmp_path / "ckpt"),
         "--max-tokens", "8", "--seed", "4", "--threads", "1"],
        input="def f(x):", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(x):")
    generated = int(re.search(r"\+ (\d+) generated tokens", result.stderr).group(1))
    assert 1 <= generated <= 8 and len(result.stdout) > len("def f(x):")  # (EOS may end it)


def test_generate_from_a_run_directory_uses_its_latest_checkpoint(tmp_path, capsys) -> None:
    from dsv4.weights.checkpoint import save_to_run

    model = randomize(Transformer(tiny_config(vocab_size=300)), seed=2)
    save_to_run(model, tmp_path / "run", step=40, tokenizer=byte_tokenizer())
    assert main(["generate", "--run", str(tmp_path / "run"), "--ids", "5 6 7",
                 "--temperature", "0", "--max-tokens", "4", "--dtype", "fp32"]) == 0
    expected = Engine(model.eval(), max_batch=1, capacity=64).generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert [int(t) for t in capsys.readouterr().out.split()] == expected


def test_chat_reads_turns_from_stdin(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nhow are you?\n/exit\n"))
    assert main(["chat", *NANO, "--max-tokens", "4", "--think", "high"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 2  # one reply per user turn


@pytest.mark.parametrize("argv, message", [
    (["generate", "--preset", "nano", "x"], "add --random"),
    (["generate", "x"], "give a model"),
    (["generate", *NANO, "--temperature", "-1", "x"], "temperature=-1.0"),
    (["generate", *NANO, "--context", "8", "a long prompt, longer than eight bytes"],
     "the cache holds 8"),
    (["generate", *NANO, "--ids", "1 2 x"], "--ids: '1 2 x' is not a list of integers"),
    (["generate", *NANO, "--ids", "1 99999"], "token 1 = 99999 is outside the vocabulary"),
    (["generate", "--run", "/nonexistent/run", "x"], "/nonexistent/run: no such file"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_speculative_reports_acceptance(capsys) -> None:
    torch.manual_seed(0)
    assert main(["generate", *NANO, "--ids", "5 6 7", "--speculative", "--max-tokens", "5",
                 "--dtype", "fp32"]) == 0
    captured = capsys.readouterr()
    assert "of MTP drafts accepted" in captured.err
    assert len(captured.out.split()) == 5
