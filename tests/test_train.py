"""`dsv4 train`: schedules, losses, balancing, and whole runs through the real CLI entry point
(tiny model, tiny corpus, a handful of steps, one CPU thread)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.model.network import Attention, Routing
from dsv4.pretrain.train import (
    ExpertLoad,
    TrainConfig,
    TrainingError,
    indexer_mode,
    learned_routing,
    lr_factor,
    mtp_inputs_and_targets,
    mtp_weight,
    read_metrics,
    sequence_balance_loss,
)
from tests.parity_utils import STDLIB_MODULES, stdlib_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Schedules and losses
# ---------------------------------------------------------------------------------------------


def planned(**changes) -> TrainConfig:
    tc = TrainConfig(**changes)
    tc.plan()
    return tc


def test_lr_schedule_warms_up_holds_and_decays_to_a_tenth() -> None:
    tc = planned(steps=100, lr=1.0)
    assert (tc.warmup_steps, tc.decay_start_step, tc.decay_end_step) == (5, 70, 100)
    factors = [lr_factor(s, tc) for s in range(120)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5:71] == [1.0] * 66
    assert all(a > b for a, b in zip(factors[70:99], factors[71:100]))  # cosine, decreasing
    assert factors[99] == pytest.approx(0.1)
    assert factors[100:] == [pytest.approx(0.1)] * 20  # past the plan: the floor, no re-warm
    assert factors[85] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 29)))


def test_mtp_weight_and_indexer_mode_follow_the_plan() -> None:
    tc = planned(steps=10)
    assert [mtp_weight(s, tc) for s in (0, 6, 7, 9)] == [0.3, 0.3, 0.1, 0.1]
    assert [indexer_mode(s, tc) for s in (0, 4, 5, 9)] == ["dense", "dense", "sparse", "sparse"]


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(TrainingError, match="seq_len=100"):
        planned(seq_len=100)
    with pytest.raises(TrainingError, match="optimizer='sgd'"):
        planned(optimizer="sgd")


def test_mtp_targets_are_two_ahead_inside_a_document() -> None:
    # one row: document [5 6 7 8] (EOS=8 has no target), a pad, then [9 10 ...] continuing
    targets = torch.tensor([[6, 7, 8, -100, -100, 10, 11, 12]])
    inputs, mtp = mtp_inputs_and_targets(targets, pad_id=2)
    assert inputs.tolist() == [[6, 7, 8, 2, 2, 10, 11, 12]]
    assert mtp.tolist() == [[7, 8, -100, -100, -100, 11, 12, -100]]


def test_sequence_balance_loss_is_one_when_balanced_and_larger_when_not() -> None:
    experts = 4
    # every token routes to 2 of 4 experts, cycling: perfectly even counts and uniform scores
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    scores = torch.ones(4, experts)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert sequence_balance_loss(indices, scores, mask, experts) == pytest.approx(1.0)
    skewed = torch.tensor([[0, 1]] * 4)
    skewed_scores = torch.tensor([[4.0, 4.0, 1.0, 1.0]] * 4, requires_grad=True)
    loss = sequence_balance_loss(skewed, skewed_scores, mask, experts)
    assert loss.item() == pytest.approx(2 * (2 * 0.4))  # f = 2 on two experts, P = 0.4 each
    loss.backward()
    assert skewed_scores.grad is not None
    # pad tokens are not counted: masking the skewed half leaves the balanced half
    both = torch.cat((indices, skewed))
    mask = torch.tensor([[True] * 4 + [False] * 4])
    assert sequence_balance_loss(both, torch.ones(8, experts), mask, experts) == pytest.approx(1.0)


def test_loss_free_bias_update_lowers_overloaded_experts() -> None:
    model = dsv4.Transformer(tiny_config(n_hash_layers=1))
    load = ExpertLoad(model, 8, torch.device("cpu"))
    assert [name for name, _ in load.layers] == ["layers.1.ffn", "layers.2.ffn", "layers.3.ffn",
                                                 "mtp.0.ffn"]  # hash layer 0 excluded
    indices = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)
    routing = [Routing(indices, torch.ones(8, 8))] * len(load.layers)
    load.add(routing, torch.ones(1, 8, dtype=torch.bool))
    assert load.max_violation() == pytest.approx(6 / 2 - 1)
    load.update_biases(0.001)
    bias = load.layers[0][1].gate.bias
    assert bias[:2].tolist() == pytest.approx([-0.001] * 2)  # overloaded
    assert bias[2:4].tolist() == [0.0, 0.0]  # exactly at the mean load of 2
    assert bias[4:].tolist() == pytest.approx([0.001] * 4)  # idle


def test_learned_routing_lines_up_with_the_balanced_layers() -> None:
    """The routing the balance loss and the load statistics read is each layer's own."""
    model = dsv4.Transformer(tiny_config(n_hash_layers=1))
    load = ExpertLoad(model, 8, torch.device("cpu"))
    with torch.no_grad():
        for expert, (_, moe) in enumerate(load.layers):  # each layer favours its own expert
            moe.gate.bias[expert] = 100.0
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=gen)
        _, signals = model(ids, mtp_input_ids=ids, signals=True)
    routing = learned_routing(signals, model.cfg.n_hash_layers)
    assert len(routing) == len(load.layers)
    for expert, (indices, _) in enumerate(routing):
        assert bool((indices == expert).any(dim=-1).all())


# ---------------------------------------------------------------------------------------------
# Whole runs through `dsv4 train`
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A tiny model config and a small real corpus (a few stdlib modules)."""
    modules = STDLIB_MODULES + ("heapq.py", "copy.py", "keyword.py", "colorsys.py", "queue.py",
                                "sched.py", "graphlib.py")
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), modules)


def train_args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(corpus["config"]), "--data", str(corpus["data"]),
            "--out", str(out), "--cache-dir", str(corpus["cache"]), "--batch-size", "2",
            "--seq-len", "256", "--threads", "1", "--no-progress", *extra]


@pytest.mark.slow
def test_a_run_writes_everything_and_ends_sparse(corpus, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    rc = main(train_args(corpus, run, "--steps", "4", "--eval-every", "2", "--save-every", "2",
                         "--samples", "1"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "def " in out.split("-" * 60)[-1]  # the sample, after its separator
    for name in ("config.json", "train_config.json", "tokenizer.json", "metrics.jsonl",
                 "loss.png"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm", "mtp_loss",
                "balance_loss", "indexer_loss", "expert_load_max_violation"} <= set(row)
        assert math.isfinite(row["loss"]) and row["tokens_per_s"] > 0
    assert [r["indexer_mode"] for r in rows] == ["dense", "dense", "sparse", "sparse"]
    assert rows[1]["val_loss"] is not None and rows[3]["val_loss"] is not None
    assert rows[0]["indexer_loss"] > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_000002", "step_000004"]
    model = dsv4.load(run)
    assert model.cfg.vocab_size == 384
    # the balancing biases moved and were saved with the weights
    assert model.layers[1].ffn.gate.bias.abs().sum() > 0
    # sparse top-k is what the loaded model (and the final samples) use
    assert all(m.indexer_mode == "sparse" for m in model.modules()
               if isinstance(m, Attention) and m.indexer is not None)
    # an existing run is not overwritten by accident
    assert main(train_args(corpus, run, "--steps", "4")) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_exactly(corpus, tmp_path: Path) -> None:
    """A run stopped at step 2 and resumed to step 4 has the uninterrupted run's losses,
    bit for bit (CPU)."""
    from dsv4.pretrain.train import train

    def settings(out: Path, steps: int) -> TrainConfig:
        # the same plan for both runs: the schedule is fixed when a run is created
        return TrainConfig(out=str(out), preset=None, config_path=str(corpus["config"]),
                           data=[str(corpus["data"])], steps=steps, batch_size=2, seq_len=256,
                           warmup_steps=1, decay_start_step=2, decay_end_step=4,
                           sparse_start_step=2, eval_every=2, save_every=2, samples=0,
                           threads=1, cache_dir=str(corpus["cache"]), progress=False)

    log = lambda *a: None  # noqa: E731
    train(settings(tmp_path / "straight", 4), log=log)
    train(settings(tmp_path / "resumed", 2), log=log)
    assert main(train_args(corpus, tmp_path / "resumed", "--resume", "--steps", "4",
                           "--samples", "0")) == 0
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("loss", "mtp_loss", "val_loss", "lr", "grad_norm", "indexer_loss"):
            assert a.get(key) == b.get(key), (a["step"], key)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path: Path,
                                                           capsys) -> None:
    run = tmp_path / "run"
    rc = main(train_args(corpus, run, "--steps", "6", "--save-every", "1", "--lr", "1e4",
                         "--warmup-steps", "0", "--samples", "0"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "training stopped" in err and "latest checkpoint" in err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    rows = read_metrics(run)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert latest == f"step_{rows[-1]['step']:06d}"
    dsv4.load(run)  # still loadable


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(corpus, tmp_path: Path) -> None:
    """A real process interrupted with SIGINT saves a checkpoint at the step it finished."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "dsv4", *train_args(
        corpus, run, "--steps", "200", "--samples", "0", "--save-every", "1000")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "--resume" in out
    rows = read_metrics(run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{rows[-1]['step']:06d}" and rows[-1]["step"] < 200
    assert json.loads((run / "train_config.json").read_text())["steps"] == 200


@pytest.mark.slow
def test_gradient_accumulation_takes_the_full_batch_step(corpus, tmp_path: Path) -> None:
    """Two micro-batches of one sequence give the step of one batch of two (fp32)."""
    losses = {}
    for name, extra in (("whole", []), ("accumulated", ["--micro-batch", "1"])):
        assert main(train_args(corpus, tmp_path / name, "--steps", "3", "--fp32",
                               "--samples", "0", *extra)) == 0
        losses[name] = [(r["loss"], r["mtp_loss"], r["grad_norm"])
                        for r in read_metrics(tmp_path / name)]
    for whole, accumulated in zip(losses["whole"], losses["accumulated"]):
        assert accumulated == pytest.approx(whole, rel=1e-4)
