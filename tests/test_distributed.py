"""`torchrun --nproc_per_node 2 -m dsv4 train`: two real CPU processes (gloo, FSDP2, Muon on
sharded parameters) follow the single-process run's loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.pretrain.train import read_metrics
from tests.parity_utils import tiny_config

pytestmark = pytest.mark.slow  # torchrun: real processes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Short documents (< 126 bytes, so each fills one 128-token row on its own): the two ranks
    then share out exactly the rows one process sees, and the global batches are equal."""
    import sysconfig

    root = tmp_path_factory.mktemp("dist")
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    lines = [line for line in source.splitlines() if 20 < len(line.encode()) < 120]
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[:200]))
    config = root / "tiny.json"
    tiny_config(vocab_size=320, n_hash_layers=1).save(config)
    return dict(root=root, docs=docs, config=config)


def run_train(setup: dict[str, Path], out: Path, processes: int, *extra: str) -> list[dict]:
    args = ["-m", "dsv4", "train", "--config", str(setup["config"]), "--data",
            str(setup["docs"]), "--out", str(out), "--cache-dir", str(setup["root"] / "cache"),
            "--batch-size", "4", "--seq-len", "128", "--threads", "1",
            "--fp32", "--samples", "0", "--no-progress", "--eval-every", "3", *extra]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(out)


def three_then_five(setup: dict[str, Path], name: str, processes: int, *extra: str) -> list:
    """Three steps, then a resume to step 5 (the sharded optimizer state is reloaded: the
    step-5 loss depends on the momentum saved at step 3)."""
    run_train(setup, setup["root"] / name, processes, "--steps", "3", *extra)
    return run_train(setup, setup["root"] / name, processes, "--resume", "--steps", "5", *extra)


@pytest.fixture(scope="module")
def single(setup: dict[str, Path]) -> list[dict]:
    return three_then_five(setup, "single", 1)


def assert_same_trajectory(single: list[dict], other: list[dict]) -> None:
    assert [r["step"] for r in other] == [1, 2, 3, 4, 5]
    for a, b in zip(single, other):
        assert b["tokens"] == a["tokens"]  # the same global batch
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (a["step"], key, a[key], b[key])


def test_two_processes_match_one(setup: dict[str, Path], single: list[dict]) -> None:
    assert_same_trajectory(single, three_then_five(setup, "double", 2))
    # the sharded checkpoint was gathered into an ordinary one
    import dsv4

    model = dsv4.load(setup["root"] / "double")
    assert model.layers[1].ffn.gate.bias.abs().sum() > 0


def test_expert_parallel_matches_one(setup: dict[str, Path], single: list[dict]) -> None:
    """--expert-parallel: each process holds 4 of the 8 experts of every MoE layer (the MTP
    block's too); losses follow the single process, also after the resume, which scatters the
    experts of the gathered checkpoint again. The checkpoint is an ordinary full one."""
    import torch

    import dsv4

    assert_same_trajectory(single, three_then_five(setup, "ep", 2, "--expert-parallel"))
    ep = dsv4.load(setup["root"] / "ep").state_dict()
    reference = dsv4.load(setup["root"] / "single").state_dict()
    assert ep.keys() == reference.keys()
    for name in ("layers.1.ffn.experts.w1", "mtp.0.ffn.experts.w2", "layers.1.ffn.gate.bias"):
        assert ep[name].shape == reference[name].shape
        torch.testing.assert_close(ep[name], reference[name], atol=1e-4, rtol=1e-3, msg=name)


def test_expert_parallel_needs_divisible_experts() -> None:
    from dsv4.model.network import RoutedExperts
    from dsv4.pretrain.parallel import ExpertParallelExperts

    class ThreeRanks:  # only the size is read before the check
        def size(self) -> int:
            return 3

        def get_local_rank(self) -> int:
            return 0

    with pytest.raises(ValueError, match=r"n_routed_experts=8 .* 3 processes"):
        ExpertParallelExperts(RoutedExperts(8, 4, 4, 10.0), ThreeRanks())
