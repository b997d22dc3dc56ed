"""`dsv4 posttrain`, `sft`, `grpo`, `distill` end to end on a tiny model (seconds), resuming,
and their one-line errors."""

from __future__ import annotations

import json

import pytest

import dsv4
from dsv4.cli import main
from dsv4.model.network import Transformer
from dsv4.text.tokenizer import byte_tokenizer
from dsv4.weights.checkpoint import save_to_run
from tests.parity_utils import randomize, tiny_config

TINY_STAGES = ["--sft-steps", "2", "--specialist-sft-steps", "1", "--grpo-steps", "1",
               "--distill-steps", "1", "--group-size", "2", "--prompts-per-step", "2",
               "--prompts-per-domain", "2", "--sft-problems", "16", "--eval-size", "3",
               "--batch-size", "4", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = randomize(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), seed=2)
    run = tmp_path_factory.mktemp("tiny") / "run"
    save_to_run(model, run, 0, tokenizer=tokenizer)
    return run


@pytest.mark.slow
def test_posttrain_end_to_end_and_resume(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "pt"
    args = ["posttrain", "--from", str(tiny_run), "--out", str(out), "--domains", "sum", "sort",
            *TINY_STAGES]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    domains = ["sum", "sort"]
    assert set(results["base"]) == set(results["student"]) == set(domains)
    assert set(results["specialists"]) == set(domains)
    assert all(set(row) == set(domains) for row in results["specialists"].values())
    values = [results["base"][d] for d in domains] + [results["student"][d] for d in domains]
    assert all(0 <= v <= 1 for v in values)
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    for stage in ("base", "sft-sum", "specialist-sum", "specialist-sort", "student"):
        assert (out / stage / "posttrain_stage.json").is_file()
        assert (out / stage / "tokenizer.json").is_file()
    student = dsv4.load(out / "student")
    assert student.cfg.vocab_size == byte_tokenizer().vocab_size
    grpo_metrics = [json.loads(line) for line in
                    (out / "specialist-sum" / "metrics.jsonl").read_text().splitlines()]
    for row in grpo_metrics:  # steps without a group of mixed rewards train nothing
        trained = {"kl", "clip_fraction", "loss"} if row["trained_sequences"] else set()
        assert {"reward", "mixed_groups"} | trained <= set(row)
    capsys.readouterr()
    assert main(args) == 0  # a rerun skips every finished stage
    printed = capsys.readouterr().out
    assert "base: done already" in printed and "distill: done already" in printed


@pytest.mark.slow
def test_single_stage_commands(tiny_run, tmp_path, capsys) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    sft = tmp_path / "sft"
    common = ["--threads", "1", "--no-progress", "--steps", "1"]
    assert main(["sft", "--from", str(tiny_run), "--data", str(chat), "--domains", "sum",
                 "--problems", "8", "--out", str(sft), "--batch-size", "4", *common]) == 0
    grpo = tmp_path / "grpo"
    assert main(["grpo", "--from", str(sft), "--domain", "sum", "--out", str(grpo),
                 "--group-size", "2", "--prompts-per-step", "2", "--max-tokens", "4",
                 "--eval-size", "2", *common]) == 0
    distill = tmp_path / "distill"
    assert main(["distill", "--student", str(sft), "--teacher", f"sum={grpo}",
                 "--out", str(distill), "--prompts-per-domain", "2", "--eval-size", "2",
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "before: sum held-out accuracy" in printed and "student: sum" in printed
    assert dsv4.load(distill) is not None


@pytest.mark.parametrize("argv, message", [
    (["grpo", "--from", "{run}", "--domain", "nope", "--out", "{tmp}/x"],
     "unknown domain 'nope'; known:"),
    (["sft", "--from", "{run}", "--out", "{tmp}/x"], "give training data"),
    (["sft", "--from", "{run}", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/x"],
     "bad.jsonl, line 1: not valid JSON"),
    (["posttrain", "--from", "{tmp}/missing", "--out", "{tmp}/x"], "missing: no such file"),
    (["sft", "--from", "{run}", "--domains", "sum", "--out", "{run}"], "already holds a run"),
    (["posttrain", "--from", "{run}", "--domain-module", "{tmp}/none.py"], "none.py: no such"),
])
def test_bad_input_is_one_line_exit_2(tiny_run, tmp_path, capsys, argv, message) -> None:
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    argv = [a.format(run=tiny_run, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_teacher_option_format(tiny_run, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--student", str(tiny_run), "--teacher", "nodomain",
              "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "expected DOMAIN=RUN" in capsys.readouterr().err


@pytest.mark.parametrize("reward", ["mixed", "constant"])
@pytest.mark.slow
def test_grpo_trains_only_groups_with_mixed_rewards(tiny_run, tmp_path, reward) -> None:
    """Groups whose samples all score the same carry no advantage: GRPO skips them, and a
    step with none of the other kind leaves the policy untouched."""
    import torch

    from dsv4.posttrain.common import load_model_and_tokenizer
    from dsv4.posttrain.grpo import GRPOConfig, run_grpo
    from dsv4.tasks import FunctionDomain, Problem

    def check(problem: Problem, response: str) -> bool:  # ~half the random samples pass
        return reward == "mixed" and len(response.encode()) % 2 == 0

    domain = FunctionDomain("parity", lambda rng: Problem(f"n {rng.randint(0, 10**6)}", ""),
                            check)
    model, tokenizer = load_model_and_tokenizer(tiny_run)
    reference, _ = load_model_and_tokenizer(tiny_run)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_tokens=6, lr=1e-3,
                     progress=False)
    run_grpo(model, reference, tokenizer, domain, cfg, out=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["trained_sequences"] for row in rows] == [
        round(row["mixed_groups"] * cfg.prompts_per_step) * cfg.group_size for row in rows]
    trained = sum(row["trained_sequences"] for row in rows)
    assert (trained > 0) == (reward == "mixed")
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == (trained > 0)
