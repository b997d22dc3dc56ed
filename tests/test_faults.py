"""Bad days: a full disk, a killed process, two processes on one run, corrupted weights,
hostile `latest` files, broken data. Every fault ends in one line naming the file (no
traceback), loses nothing that was finished, and leaves a run that resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.cli import main
from dsv4.pretrain.train import read_metrics
from dsv4.weights.checkpoint import save_to_run
from tests.faults import full_disk
from tests.parity_utils import stdlib_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def train_args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(corpus["config"]), "--data", str(corpus["data"]),
            "--out", str(out), "--cache-dir", str(corpus["cache"]), "--batch-size", "1",
            "--seq-len", "128", "--threads", "1", "--no-progress", "--samples", "0",
            "--save-every", "1", *extra]


def one_line_error(err: str, *names: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])


# ---- a full disk --------------------------------------------------------------------------
@pytest.mark.slow
def test_full_disk_during_a_metrics_append_leaves_a_run_that_resumes(corpus, tmp_path, capsys,
                                                                    monkeypatch) -> None:
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "2")) == 0
    size = (run / "metrics.jsonl").stat().st_size
    with monkeypatch.context() as patch:
        budget = full_disk(patch, "metrics.jsonl", after=20)  # step 3's line: cut at 20 bytes
        capsys.readouterr()
        assert main(train_args(corpus, run, "--resume", "--steps", "4")) == 1
        assert budget.failures == 1
    err = capsys.readouterr().err
    one_line_error(err, str(run / "metrics.jsonl"), "no space left on device", "--resume")
    assert (run / "metrics.jsonl").stat().st_size == size  # no torn line left behind
    assert main(train_args(corpus, run, "--resume", "--steps", "4")) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_an_extended_run_resumed_after_a_failure_equals_the_uninterrupted_one(
        corpus, tmp_path, monkeypatch) -> None:
    """A 2-step run extended with --resume --steps 4, stopped by a full disk at step 3 and
    resumed again, trains as the uninterrupted extension does. (The first resume saved a
    schedule re-planned for 4 steps from the command line; the second trained with it.)"""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for run in (whole, broken):
        assert main(train_args(corpus, run, "--steps", "2")) == 0
    assert main(train_args(corpus, whole, "--resume", "--steps", "4")) == 0
    with monkeypatch.context() as patch:
        full_disk(patch, "trainer.pt", after=1000)
        assert main(train_args(corpus, broken, "--resume", "--steps", "4")) == 1
    assert main(train_args(corpus, broken, "--resume", "--steps", "4")) == 0

    def logged(run: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run)]

    assert logged(broken) == logged(whole)
    for run in (whole, broken):  # the plan made at the start is kept: steps 3-4 at the floor
        saved = json.loads((run / "train_config.json").read_text())
        assert (saved["steps"], saved["decay_end_step"], saved["out"]) == (4, 2, str(run))


@pytest.mark.slow
def test_resume_drops_a_torn_last_metrics_line_and_says_so(corpus, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "2")) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.1, "lr": 0.0')  # what a kill mid-append leaves
    assert read_metrics(run)[-1]["step"] == 2  # readers skip it too
    capsys.readouterr()
    assert main(train_args(corpus, run, "--resume", "--steps", "3")) == 0
    out = capsys.readouterr().out
    assert "dropped a torn last line" in out and "metrics.jsonl" in out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


@pytest.mark.slow
def test_damage_before_the_last_metrics_line_is_named(corpus, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "2")) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(train_args(corpus, run, "--resume", "--steps", "3")) == 2
    one_line_error(capsys.readouterr().err, f"{run / 'metrics.jsonl'}:1")


@pytest.mark.slow
def test_full_disk_while_saving_names_the_checkpoint_and_keeps_latest(corpus, tmp_path, capsys,
                                                                      monkeypatch) -> None:
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "1")) == 0
    with monkeypatch.context() as patch:
        full_disk(patch, "trainer.pt", after=1000)
        capsys.readouterr()
        assert main(train_args(corpus, run, "--resume", "--steps", "2")) == 1
    one_line_error(capsys.readouterr().err, "trainer.pt", "no space left on device")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
    with monkeypatch.context() as patch:
        full_disk(patch, ".shard-", after=1000)
        assert main(train_args(corpus, run, "--resume", "--steps", "2")) == 1
    one_line_error(capsys.readouterr().err, str(run / "checkpoints" / "step_000002"),
                   "no space left on device")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert main(train_args(corpus, run, "--resume", "--steps", "2")) == 0


def test_full_disk_during_convert_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    import dsv4
    from dsv4.model.network import Transformer

    model = Transformer(tiny_config())
    dsv4.save(model, tmp_path / "src")
    with monkeypatch.context() as patch:
        full_disk(patch, "safetensors", after=5000)
        rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "hf"])
    assert rc == 1
    one_line_error(capsys.readouterr().err, str(tmp_path / "out"), "no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial output


# ---- one process per run folder; leftovers of a killed one ---------------------------------
@pytest.mark.slow
def test_a_second_process_on_the_same_run_is_refused(corpus, tmp_path, capsys) -> None:
    from dsv4.files import FolderLock

    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "1")) == 0
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dsv4.files import FolderLock; lock = FolderLock(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"), str(run)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(train_args(corpus, run, "--resume", "--steps", "2")) == 2
        one_line_error(capsys.readouterr().err, str(run), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking (as kill -9 does): the lock went with it
    with FolderLock(run):
        pass
    assert main(train_args(corpus, run, "--resume", "--steps", "2")) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.slow
def test_leftovers_of_killed_writes_are_removed_on_the_next_start(corpus, tmp_path,
                                                                  capsys) -> None:
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "1")) == 0
    partial = run / "checkpoints" / ".step_000002.abc123.tmp"
    partial.mkdir()
    (partial / ".shard-00001.safetensors.x1.tmp").write_bytes(b"\0" * 4096)
    (run / "checkpoints" / ".latest.k9.tmp").write_text("step_000002")
    (run / ".metrics.jsonl.q2.tmp").write_text("{}")
    capsys.readouterr()
    assert main(train_args(corpus, run, "--resume", "--steps", "2")) == 0
    assert "removed 3 temporary" in capsys.readouterr().out
    leftovers = [p for p in [*run.iterdir(), *(run / "checkpoints").iterdir()]
                 if p.name.endswith(".tmp")]
    assert leftovers == []


# ---- `latest` -------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00\x81binary", "binary content"),
    (b"../../x\n", "is not the name of a checkpoint folder"),
    (b"/etc\n", "is not the name of a checkpoint folder"),
    (b"step_000009\n", "does not exist"),
])
def test_a_bad_latest_file_is_one_line(tmp_path, capsys, content, message) -> None:
    import dsv4
    from dsv4.model.network import Transformer

    run = tmp_path / "run"
    save_to_run(Transformer(tiny_config()), run, step=1)
    outside = tmp_path / "x"
    dsv4.save(Transformer(tiny_config()), outside)  # a loadable checkpoint outside the run
    (run / "checkpoints" / "latest").write_bytes(content)
    assert main(["generate", "--run", str(run), "hi", "--max-tokens", "1"]) == 2
    one_line_error(capsys.readouterr().err, str(run / "checkpoints" / "latest"), message)


# ---- corrupted weights ------------------------------------------------------------------------
def struct_bytes(fmt: str, value: float, flip: int = 0) -> bytes:
    """Raw bytes of `value` (fp32 stored in fp32 or bf16 files: see `corrupt`)."""
    import struct

    raw = struct.pack(fmt, value)
    if flip:
        raw = struct.pack("<I", struct.unpack("<I", raw)[0] ^ flip)
    return raw


def corrupt(folder: Path, name: str, index: int, value: bytes) -> None:
    """Overwrite element `index` of tensor `name` in the files with raw bytes."""
    from dsv4.weights.checkpoint import SafetensorsFolder

    info = SafetensorsFolder(folder).infos[name]
    size = len(value)
    with open(info.file, "r+b") as f:
        f.seek(info.start + index * size)
        f.write(value)


@pytest.fixture
def saved(tmp_path) -> Path:
    import dsv4
    from dsv4.model.network import Transformer

    model = Transformer(tiny_config(dtype="bf16"))
    model.init_weights(seed=0)
    return dsv4.save(model, tmp_path / "ckpt")


@pytest.mark.parametrize("name, index, value, message", [
    ("layers.1.attn.wkv.weight", 7, struct_bytes("<f", float("nan")), "holds NaN at index [0, 7]"),
    ("layers.2.ffn.experts.w2", 3, struct_bytes("<f", float("inf")), "holds inf"),
    # 0.01 with its top exponent bit flipped: 3.4e36
    ("embed.weight", 5, struct_bytes("<f", 0.01, flip=0x40000000), "holds 3.4"),
    ("layers.0.ffn.gate.tid2eid", 2, struct_bytes("<q", 99), "expert id 99 outside [0, 8)"),
])
def test_corrupted_weights_do_not_load(saved, tmp_path, capsys, name, index, value,
                                       message) -> None:
    import dsv4
    from dsv4.weights.checkpoint import CheckpointError

    dsv4.load(saved)  # sound before
    corrupt(saved, name, index, value)
    with pytest.raises(CheckpointError, match="model.safetensors: tensor") as caught:
        dsv4.load(saved)
    assert name in str(caught.value) and message in str(caught.value)
    assert main(["generate", "--run", str(saved), "hi", "--max-tokens", "2"]) == 2
    one_line_error(capsys.readouterr().err, name, message)
    assert main(["info", str(saved), "--verify"]) == 2
    one_line_error(capsys.readouterr().err, name)
    dsv4.load(saved, verify=False)  # still readable on purpose (for forensics)


# ---- the command line: bytes that are not text, Ctrl-C, prompts that do not fit ---------------
@pytest.fixture(scope="module")
def tiny_model_args(tmp_path_factory) -> list[str]:
    config = tmp_path_factory.mktemp("model") / "tiny.json"
    tiny_config(vocab_size=384, max_seq_len=4096).save(config)
    return ["--config", str(config), "--random", "--dtype", "fp32", "--threads", "1",
            "--temperature", "0"]


def dsv4_process(*args: str | bytes, stdin: bytes | None = None,
                 **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsv4", *args],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, **popen)


def run_dsv4(*args: str | bytes, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = dsv4_process(*args)
    out, err = proc.communicate(stdin, timeout=120)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


@pytest.mark.slow
def test_non_utf8_prompts_are_one_line(tiny_model_args) -> None:
    rc, out, err = run_dsv4("generate", *tiny_model_args, stdin=b"def \xff\xfe x")
    assert rc == 2 and out == ""
    one_line_error(err, "standard input is not UTF-8 text (byte 4")
    rc, out, err = run_dsv4("generate", *tiny_model_args, b"caf\xe9")
    assert rc == 2 and out == ""
    one_line_error(err, "PROMPT is not UTF-8 text", "0xe9")


@pytest.mark.slow
def test_a_prompt_that_does_not_fit_is_refused_before_it_is_echoed(tiny_model_args) -> None:
    rc, out, err = run_dsv4("generate", *tiny_model_args, "--context", "32", "x" * 5000)
    assert rc == 2 and out == ""
    one_line_error(err, "5001 tokens", "32 per sequence")
    assert "xxxxxxxxxx" not in err


def read_until(stream, needle: bytes, into: bytearray) -> None:
    """Read `stream` byte by byte into `into` until it ends with `needle` (or EOF)."""
    while not into.endswith(needle):
        byte = stream.read(1)
        if not byte:
            return
        into += byte


@pytest.mark.slow
def test_ctrl_c_in_generate_stops_the_text_without_a_traceback(tiny_model_args) -> None:
    import signal

    proc = dsv4_process("generate", *tiny_model_args, "--max-tokens", "3000", "--context",
                        "4096", "hello")
    try:
        seen = bytearray()
        read_until(proc.stdout, b"hello", seen)
        seen += proc.stdout.read(1)  # the first generated byte: the engine is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped by Ctrl-C" in err


@pytest.mark.slow
def test_ctrl_c_in_chat_stops_the_reply_and_keeps_the_conversation(tiny_model_args,
                                                                  monkeypatch, capsys) -> None:
    """In a real process: Ctrl-C during the first reply stops it; the chat then answers the
    next line. In this process (same engine code): the stopped reply stays in the messages the
    next turn encodes."""
    import signal

    proc = dsv4_process("chat", *tiny_model_args, "--max-tokens", "60", "--context", "4096")
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        proc.stdout.read(1)  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("second line \u00e9\n/exit\n".encode())
        proc.stdin.flush()
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.count("[reply stopped") == 1

    import io

    import dsv4.inference.cli
    import dsv4.text.chat

    conversations = []
    encode_chat_ids = dsv4.text.chat.encode_chat_ids

    def recording_encode_chat_ids(tokenizer, messages, **kwargs):
        conversations.append([dict(m) for m in messages])
        return encode_chat_ids(tokenizer, messages, **kwargs)

    show_event = dsv4.inference.cli._show_event

    def ctrl_c_at_the_first_event(event):
        show_event(event)
        if len(conversations) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(dsv4.text.chat, "encode_chat_ids", recording_encode_chat_ids)
    monkeypatch.setattr(dsv4.inference.cli, "_show_event", ctrl_c_at_the_first_event)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nsecond\n/exit\n"))
    assert main(["chat", *tiny_model_args, "--max-tokens", "20", "--context", "4096"]) == 0
    first, second = conversations
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0] == first[0] and second[1]["content"]  # the stopped reply, kept


# ---- broken data files --------------------------------------------------------------------------
def test_bad_utf8_deep_in_a_jsonl_names_its_line(tmp_path) -> None:
    from dsv4.pretrain.data import DataError, iter_documents

    good = "".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(1000))  # > 64 KiB
    path = tmp_path / "big.jsonl"
    path.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"big\.jsonl:1001: not UTF-8 \(byte 13 of the line"):
        list(iter_documents([path]))


def test_a_pretty_printed_json_object_is_one_document(tmp_path) -> None:
    from dsv4.pretrain.data import iter_documents

    (tmp_path / "one.json").write_text(json.dumps({"text": "hello\nworld"}, indent=2))
    (tmp_path / "many.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    docs = list(iter_documents([tmp_path / "one.json", tmp_path / "many.json"]))
    assert [d.text for d in docs] == ["hello\nworld", "a", "b"]


@pytest.mark.slow
def test_an_empty_file_is_named(corpus, tmp_path, capsys) -> None:
    from dsv4.pretrain.data import DataError, iter_documents

    for name in ("void.txt", "void.jsonl", "void.json"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=rf"{name}: holds no text"):
            list(iter_documents([tmp_path / name]))
    assert main(train_args(corpus, tmp_path / "run", "--data", str(corpus["data"]),
                           str(tmp_path / "void.txt"))) == 2
    one_line_error(capsys.readouterr().err, str(tmp_path / "void.txt"), "holds no text")


# ---- evaluation results follow the weights and the data, not their names ---------------------
def test_eval_resume_refuses_changed_weights_or_data(tmp_path, capsys) -> None:
    from dsv4.model.network import Transformer
    from dsv4.text.tokenizer import byte_tokenizer

    run = tmp_path / "run"
    model = Transformer(tiny_config(vocab_size=384))
    model.init_weights(seed=0)
    save_to_run(model, run, step=1, tokenizer=byte_tokenizer())
    data = tmp_path / "notes.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    out = tmp_path / "eval"
    argv = ["eval", str(run), "--suite", "ppl", "--data", str(data), "--out", str(out),
            "--dtype", "fp32", "--context", "256", "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 0 and "item(s) resumed" in capsys.readouterr().out

    data.write_text("an entirely different text, with other words in it\n" * 8)
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, "data_fingerprint", "--fresh")
    assert main([*argv, "--fresh"]) == 0

    model.init_weights(seed=1)  # the run trains on: `latest` now names other weights
    save_to_run(model, run, step=2, tokenizer=byte_tokenizer())
    capsys.readouterr()
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, "weights", "step_000001", "step_000002")


@pytest.mark.slow
def test_weights_that_would_not_load_are_not_saved(corpus, tmp_path, capsys) -> None:
    """lr 1e30: the first update makes weights of ~1e29 while the loss was still finite;
    they are refused at the save (loading would refuse them too), and nothing claims a good
    checkpoint."""
    run = tmp_path / "run"
    assert main(train_args(corpus, run, "--steps", "3", "--lr", "1e30",
                           "--warmup-steps", "0")) == 1
    err = capsys.readouterr().err
    assert "after the update is NaN/inf or beyond +-1e+06 at step 1" in err
    assert "no checkpoint was written yet" in err and "Traceback" not in err
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_full_disk_while_tokenizing_and_storing_eval_results(corpus, tmp_path, capsys,
                                                             monkeypatch) -> None:
    from dsv4.evaluate.store import ResultStore

    with monkeypatch.context() as patch:
        full_disk(patch, "tokens.bin", after=100)
        # a fresh --cache-dir (the last one given wins): the token store is built, not reused
        assert main(train_args(corpus, tmp_path / "run", "--steps", "1", "--cache-dir",
                               str(tmp_path / "cache"))) == 1
    one_line_error(capsys.readouterr().err, str(tmp_path / "cache" / "tokens"),
                   "no space left on device")
    store = ResultStore(tmp_path / "eval", {"suite": "x"})
    store.add({"key": "a", "value": 1})
    with monkeypatch.context() as patch:
        full_disk(patch, "items.jsonl", after=5)
        with pytest.raises(OSError, match="items.jsonl"):
            store.add({"key": "b", "value": 2})
    assert ResultStore(tmp_path / "eval", {"suite": "x"}).records == {"a": {"key": "a",
                                                                            "value": 1}}


def test_a_convert_killed_half_way_leaves_nothing_behind_the_next_one(tmp_path) -> None:
    import dsv4
    from dsv4.model.network import Transformer

    dsv4.save(Transformer(tiny_config()), tmp_path / "src")
    partial = tmp_path / ".out.k1ll3d.tmp"  # what `dsv4 convert SRC out` leaves after kill -9
    partial.mkdir()
    (partial / ".shard-00001.safetensors.x.tmp").write_bytes(b"\0" * 1000)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "hf"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
