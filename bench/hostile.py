"""Hostile input and bad days: re-run the probe classes of issue 18 and print the totals.

    python bench/hostile.py                 # everything, ~15 min on 2 busy CPU cores
    python bench/hostile.py --only server   # one class: train, weights, data, eval, cli, server

Every probe runs the real `dsv4` command in a child process (a tiny random-weight model, a
small corpus of stdlib modules, a loopback server), injects one fault and checks what a user
would see and keep:

* train    a real full disk (a small tmpfs filled to 0 B-4.4 MB free, so ENOSPC hits the metrics
           append, a shard, trainer.pt or `latest`; injected at the write call where mounting
           is refused) with the resumed run compared to an uninterrupted one; `dsv4 convert`
           onto a full disk; a torn metrics line; two chains of kill -9 (--kills each: at
           varied delays mid-run, and inside checkpoint writes), each chain finished and
           compared bit for bit with an uninterrupted run; two processes on one run; temp
           debris; binary / escaping `latest`
* weights  NaN, +-inf, a flipped exponent bit, out-of-range and negative tid2eid, a truncated
           and an empty shard
* data     bad UTF-8 past 64 KiB of a JSONL, a pretty-printed .json object, an empty file, a
           line cut short, a line without `text`, `text` a number, binary and gzip bytes, a
           .json list, a missing path
* eval     the checkpoint behind the same path changed; the data file changed
* cli      non-UTF-8 stdin and argv, an over-long prompt, Ctrl-C in generate and in chat
* server   55 MB bodies (sized and chunked), a 7 MB text prompt, a million token ids, lone
           surrogates, 100k-deep JSON, what can never fit, prompt scoring at the limit and
           over it, 20 malformed bodies (NaN, huge ints, bad ids, wrong types), 6 malformed
           HTTP heads, 40 streams with half the clients leaving, a client leaving
           mid-scoring, 20 idle + 20 slow-header connections, streamed logprobs (800 tokens)
           against plain streaming

Columns: faults injected; survived (the command or server kept working and the run resumes);
data lost (finished steps or results gone); wrong results (garbage loaded silently, stale
eval reported); unclear messages (not one line naming the file, line or parameter);
tracebacks. For the server it also reports the slowest /health answer during any probe and
the largest RSS after a probe relative to the idle baseline (targets: under 1 s and 1.2x).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ("train", "weights", "data", "eval", "cli", "server")


@dataclass
class Outcome:
    survived: bool = True
    lost: bool = False
    wrong: bool = False
    unclear: bool = False
    traceback: bool = False
    note: str = ""


@dataclass
class Tally:
    root: str = ""  # the temporary folder, left out of the notes
    rows: dict[str, list[tuple[str, Outcome]]] = field(default_factory=dict)

    def add(self, cls: str, name: str, outcome: Outcome) -> None:
        self.rows.setdefault(cls, []).append((name, outcome))
        flags = [k for k in ("lost", "wrong", "unclear", "traceback") if getattr(outcome, k)]
        state = "ok" if outcome.survived and not flags else \
            ("FAILED" if not outcome.survived else "") + " ".join(flags)
        note = outcome.note.replace(self.root + "/", "").replace("dsv4 ", "")
        print(f"  {cls:<8}{name:<52}{state:<14}{note[:90]}", flush=True)


# ---- running dsv4 -------------------------------------------------------------------------------
CHILD = """
import sys
sys.path.insert(0, {repo!r})
if {match!r}:
    import pytest
    from tests.faults import full_disk
    full_disk(pytest.MonkeyPatch(), {match!r}, {after})
from dsv4.cli import main
sys.exit(main(sys.argv[1:]))
"""


def dsv4_popen(args: list, disk_full_at: str = "", after: int = 0,
               **popen) -> subprocess.Popen:
    code = CHILD.format(repo=str(REPO), match=disk_full_at, after=after)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, cwd=REPO, **popen)


def run(args: list, stdin: bytes = b"", **kwargs) -> tuple[int, str, str]:
    proc = dsv4_popen(args, **kwargs)
    out, err = proc.communicate(stdin, timeout=600)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def judge_error(rc: int, err: str, must_name: str, want_rc: int | None = None) -> Outcome:
    """A refused input: exit code (non-zero), one error line naming `must_name`."""
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    return Outcome(survived=rc != 0 and (want_rc is None or rc == want_rc),
                   wrong=rc == 0,
                   unclear=len(lines) != 1 or must_name not in lines[0],
                   traceback="Traceback" in err, note=(lines[0] if lines else err[-90:]))


# ---- fixtures ---------------------------------------------------------------------------------
def make_world(root: Path) -> dict[str, Path]:
    from tests.parity_utils import stdlib_corpus

    return stdlib_corpus(root, max_seq_len=4096)


def train_args(w: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(w["config"]), "--data", str(w["data"]), "--out", str(out),
            "--cache-dir", str(w["cache"]), "--batch-size", "1", "--seq-len", "128",
            "--threads", "1", "--no-progress", "--samples", "0", "--save-every", "1", *extra]


def steps_of(run_dir: Path) -> list[int]:
    from dsv4.pretrain.train import read_metrics

    return [r["step"] for r in read_metrics(run_dir)]


def resumes(w: dict, run_dir: Path, steps: int) -> tuple[bool, bool]:
    """(the run resumes to `steps`, no step is missing or doubled in its metrics)."""
    rc, _, _ = run(train_args(w, run_dir, "--resume", "--steps", str(steps)))
    return rc == 0, steps_of(run_dir) == list(range(1, steps + 1))


# ---- the probe classes ------------------------------------------------------------------------
def probe_train(w: dict, tally: Tally, kills: int) -> None:
    base = w["root"] / "train"
    template = base / "template"  # 2 steps done: the start of every case that resumes a run
    run(train_args(w, template, "--steps", "2"))
    reference = copy_run(template, base / "reference")
    run(train_args(w, reference, "--resume", "--steps", "4"))
    want = fingerprint(reference)
    probe_full_disk(w, tally, template, want)

    run_dir = copy_run(template, base / "torn")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.')
    rc, out, err = run(train_args(w, run_dir, "--resume", "--steps", "4"))
    tally.add("train", "a torn last metrics line, then --resume", Outcome(
        survived=rc == 0, lost=steps_of(run_dir) != [1, 2, 3, 4],
        wrong=fingerprint(run_dir) != want, unclear="torn last line" not in out,
        traceback="Traceback" in err))

    kill_chain(w, tally, base / "chain-mid-run", "metrics", kills)
    kill_chain(w, tally, base / "chain-in-writes", "tmp", kills)

    run_dir = copy_run(template, base / "locked")
    first = dsv4_popen(train_args(w, run_dir, "--resume", "--steps", "8"))
    time.sleep(1.0)  # let the first one take the lock (it holds it for the whole run)
    rc, _, err = run(train_args(w, run_dir, "--resume", "--steps", "8"))
    first.communicate(timeout=600)
    outcome = judge_error(rc, err, str(run_dir))
    outcome.lost = steps_of(run_dir) != list(range(1, 9))
    tally.add("train", "two --resume on one run folder", outcome)

    run_dir = copy_run(template, base / "debris")
    (run_dir / "checkpoints" / ".step_000003.x.tmp").mkdir()
    (run_dir / "checkpoints" / ".step_000003.x.tmp" / "part").write_bytes(b"\0" * 2**20)
    (run_dir / "checkpoints" / ".latest.y.tmp").write_text("step_000003")
    rc, out, err = run(train_args(w, run_dir, "--resume", "--steps", "3"))
    left = [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    tally.add("train", "temp debris of killed writes, then --resume", Outcome(
        survived=rc == 0 and not left, unclear="removed 2 temporary" not in out,
        traceback="Traceback" in err, note=f"{len(left)} left"))

    for name, content in [("binary bytes in checkpoints/latest", b"\x00\xff\xfe\x81"),
                          ("latest = ../../x (outside the run)", b"../../x\n")]:
        run_dir = copy_run(template, base / ("binary" if b"\x00" in content else "escape"))
        (run_dir / "checkpoints" / "latest").write_bytes(content)
        rc, _, err = run(["generate", "--run", str(run_dir), "hi", "--max-tokens", "1"])
        tally.add("train", name, judge_error(rc, err, "latest", want_rc=2))


def copy_run(template: Path, run_dir: Path) -> Path:
    import shutil

    shutil.copytree(template, run_dir, ignore=shutil.ignore_patterns(".lock"))
    return run_dir


def fingerprint(run_dir: Path) -> tuple[list, str]:
    """(step and loss of every logged step, a hash of the latest checkpoint's weights): equal
    for a resumed run and an uninterrupted one (training is deterministic on one CPU)."""
    import hashlib

    from dsv4.pretrain.train import read_metrics

    checkpoints = run_dir / "checkpoints"
    try:
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        weights = hashlib.sha256((latest / "model.safetensors").read_bytes()).hexdigest()
    except (OSError, UnicodeDecodeError):
        weights = "unreadable"
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)], weights


# ---- a full disk --------------------------------------------------------------------------------
# Bytes left free on a real (tmpfs) file system before `--resume --steps 4` from step 2: each
# step writes a metrics line (~0.4 KB), then a checkpoint (config and tokenizer ~9 KB, weights
# 2.1 MB, trainer.pt 2.4 MB, `latest`), then drops the oldest checkpoint.
FREE_BYTES = (0, 6_000, 1_000_000, 2_200_000, 3_000_000, 4_400_000)


def probe_full_disk(w: dict, tally: Tally, template: Path, want: tuple) -> None:
    base = w["root"] / "train"
    if not mount_tmpfs(base / "probe-mount", "1m"):
        print("  (cannot mount a tmpfs here: ENOSPC is injected at the write call instead)")
        return probe_injected_full_disk(w, tally, template, want)
    umount(base / "probe-mount")
    for free in FREE_BYTES:
        disk = base / f"disk-{free}"
        mount_tmpfs(disk, "24m")
        try:
            run_dir = copy_run(template, disk / "run")
            filler = fill(disk, leave=free)
            rc, _, err = run(train_args(w, run_dir, "--resume", "--steps", "4"))
            outcome = judge_error(rc, err, str(run_dir))
            outcome.unclear |= "no space left" not in outcome.note.lower()
            filler.unlink()
            rc, _, _ = run(train_args(w, run_dir, "--resume", "--steps", "4"))
            got = fingerprint(run_dir)
            outcome.survived &= rc == 0
            outcome.lost = [s for s, _ in got[0]] != [1, 2, 3, 4]
            outcome.wrong = got != want
            tally.add("train", f"a full disk (tmpfs), {free:,} bytes free at step 2", outcome)
        finally:
            umount(disk)

    disk = base / "disk-convert"
    mount_tmpfs(disk, "1m")
    try:
        rc, _, err = run(["convert", str(template), str(disk / "hf"), "--to", "hf"])
        outcome = judge_error(rc, err, str(disk))
        left = [p.name for p in disk.iterdir()]
        outcome.survived &= not left
        outcome.note += f" (left behind: {left})" if left else ""
        tally.add("train", "dsv4 convert onto a full disk (tmpfs)", outcome)
    finally:
        umount(disk)


def probe_injected_full_disk(w: dict, tally: Tally, template: Path, want: tuple) -> None:
    for name, match, after, must in [("ENOSPC in a metrics.jsonl append", "metrics.jsonl", 20,
                                      "metrics.jsonl"),
                                     ("ENOSPC writing trainer.pt", "trainer.pt", 1000,
                                      "trainer.pt"),
                                     ("ENOSPC writing a checkpoint shard", ".shard-", 1000,
                                      "step_000003")]:
        run_dir = copy_run(template, w["root"] / "train" / name.split()[-1].replace(".", "_"))
        rc, _, err = run(train_args(w, run_dir, "--resume", "--steps", "4"),
                         disk_full_at=match, after=after)
        outcome = judge_error(rc, err, must)
        rc, _, _ = run(train_args(w, run_dir, "--resume", "--steps", "4"))
        got = fingerprint(run_dir)
        outcome.survived &= rc == 0
        outcome.lost = [s for s, _ in got[0]] != [1, 2, 3, 4]
        outcome.wrong = got != want
        tally.add("train", name, outcome)


def mount_tmpfs(where: Path, size: str) -> bool:
    """A real small file system at `where` (False where this machine refuses the mount)."""
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all the free space of `disk` but `leave` bytes."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with filler.open("wb") as f:
        f.truncate(0)
        left = stat.f_bavail * stat.f_frsize - leave - 4096  # the filler's own inode block
        while left > 0:
            left -= f.write(b"\0" * min(left, 2**20))
    return filler


# ---- kill -9 ----------------------------------------------------------------------------------
CHAIN_STEPS = 12
KILL_DELAYS_S = {"metrics": (0.0, 0.3, 0.7, 1.1, 0.15, 0.5, 0.9, 1.4),  # after a step is logged
                 "tmp": (0.0, 0.004, 0.012, 0.03, 0.002, 0.008, 0.02, 0.05)}  # after a .tmp


def kill_chain(w: dict, tally: Tally, run_dir: Path, wait_for: str, kills: int) -> None:
    """One run of CHAIN_STEPS, kill -9'd `kills` times at varied points (each time it has
    logged a new step, or a checkpoint write of a new step is under way) and resumed; then
    finished and compared with an uninterrupted run of the same length."""
    what = "mid-run" if wait_for == "metrics" else "inside a checkpoint write"
    rows = []
    for i in range(kills):
        resume = ["--resume"] if (run_dir / "checkpoints" / "latest").is_file() else []
        proc = dsv4_popen(train_args(w, run_dir, *resume, "--steps", str(CHAIN_STEPS)))
        before = latest_step(run_dir)
        hit = wait_and_kill(proc, run_dir, wait_for, KILL_DELAYS_S[wait_for][i % 8], before)
        if hit is None:  # the run ended first
            break
        rows.append(hit)
    rc, _, err = run(train_args(w, run_dir, "--resume", "--steps", str(CHAIN_STEPS)))
    reference = w["root"] / "train" / "reference-chain"
    if not reference.exists():
        run(train_args(w, reference, "--steps", str(CHAIN_STEPS)))
    got, want = fingerprint(run_dir), fingerprint(reference)
    for hit in rows:
        tally.add("train", f"kill -9 {what} ({hit})", Outcome(
            survived=rc == 0, lost=[s for s, _ in got[0]] != list(range(1, CHAIN_STEPS + 1)),
            wrong=got != want, traceback="Traceback" in err,
            note="" if got == want else "resumed run differs from the uninterrupted one"))


def latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    except (OSError, ValueError):
        return 0


def wait_and_kill(proc: subprocess.Popen, run_dir: Path, wait_for: str, delay: float,
                  before: int) -> str | None:
    """kill -9 `delay` seconds after this process logged a step past the checkpoint it resumed
    from, or after it began a checkpoint write following a new checkpoint. None if it ended
    first."""
    deadline = time.monotonic() + 300
    checkpoints = run_dir / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        # mid-run: once a new step is logged; in a write: in the write after a new
        # checkpoint, so that each kill lands on a later step than the one before
        progressed = latest_step(run_dir) > before or (
            wait_for == "metrics" and before and max(steps_of(run_dir), default=0) > before)
        if progressed and wait_for == "metrics":
            break
        if progressed and wait_for == "tmp" and any(
                p.name.endswith(".tmp") for p in checkpoints.iterdir()):
            break
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        proc.communicate()
        return None
    writing = [p.name.split(".")[1] for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    step = latest_step(run_dir)
    return f"at step {step}, writing {'/'.join(writing)}" if writing else \
        f"at step {step}, between writes"


def probe_weights(w: dict, tally: Tally) -> None:
    import dsv4
    from dsv4.model.network import Transformer
    from dsv4.weights.checkpoint import SafetensorsFolder
    from tests.parity_utils import tiny_config

    nan, inf = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))
    flipped = struct.pack("<I", struct.unpack("<I", struct.pack("<f", 0.01))[0] ^ 0x40000000)
    cases = [("NaN in an attention weight", "layers.1.attn.wkv.weight", nan),
             ("inf in a routed expert", "layers.2.ffn.experts.w2", inf),
             ("a flipped exponent bit in the embedding", "embed.weight", flipped),
             ("tid2eid expert id out of range", "layers.0.ffn.gate.tid2eid",
              struct.pack("<q", 99)),
             ("a negative tid2eid expert id", "layers.0.ffn.gate.tid2eid",
              struct.pack("<q", -3)),
             ("NaN in the output head", "head.weight", nan),
             ("-inf in a norm weight", "layers.0.attn_norm.weight",
              struct.pack("<f", float("-inf"))),
             ("a truncated shard", None, b""),
             ("a shard cut to 0 bytes", None, None)]
    for name, tensor, value in cases:
        model = Transformer(tiny_config(vocab_size=384))
        model.init_weights(seed=0)
        folder = dsv4.save(model, w["root"] / "weights" / name.replace(" ", "_"))
        if tensor is None:
            file = folder / "model.safetensors"
            file.write_bytes(file.read_bytes()[:-1000] if value is not None else b"")
            must = "model.safetensors"
        else:
            info = SafetensorsFolder(folder).infos[tensor]
            with open(info.file, "r+b") as f:
                f.seek(info.start + 5 * len(value))
                f.write(value)
            must = tensor
        rc, _, err = run(["generate", "--run", str(folder), "hi", "--max-tokens", "4"])
        tally.add("weights", name, judge_error(rc, err, must, want_rc=2))


def probe_data(w: dict, tally: Tally) -> None:
    import gzip

    root = w["root"] / "bad-data"
    root.mkdir()
    good = "".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(1000))
    files = {  # name: (contents, what the error must name, what is wrong)
        "deep.jsonl": (good.encode() + b'{"text": "caf\xe9"}\n', "deep.jsonl:1001",
                       "bad UTF-8 past 64 KiB"),
        "empty.txt": (b"", "empty.txt", "empty"),
        "cut.jsonl": (b'{"text": "a"}\n{"text": "b\n', "cut.jsonl:2", "a line cut short"),
        "notext.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', "notext.jsonl:2",
                         "a line without the text field"),
        "number.jsonl": (b'{"text": 5}\n', "number.jsonl:1", "text holding a number"),
        "binary.txt": (bytes(range(256)) * 64, "binary.txt", "binary bytes in a .txt"),
        "packed.jsonl": (gzip.compress(good.encode()), "packed.jsonl",
                         "gzip bytes named .jsonl"),
        "list.json": (b"[1, 2, 3]", "list.json", "a .json list of numbers"),
    }
    for name, (content, must, what) in files.items():
        (root / name).write_bytes(content)
        rc, _, err = run(train_args(w, root / f"run-{name}", "--data", str(w["data"]),
                                    str(root / name), "--steps", "1"))
        tally.add("data", f"{name}: {what}", judge_error(rc, err, must, want_rc=2))
    rc, _, err = run(train_args(w, root / "run-missing", "--data", str(root / "nowhere.jsonl"),
                                "--steps", "1"))
    tally.add("data", "a data path that does not exist", judge_error(rc, err, "nowhere.jsonl",
                                                                    want_rc=2))
    (root / "pretty.json").write_text(json.dumps({"text": "def f():\n    return 1\n" * 50},
                                                 indent=2))
    rc, _, err = run(train_args(w, root / "run-pretty", "--data", str(w["data"]),
                                str(root / "pretty.json"), "--steps", "1"))
    tally.add("data", "pretty.json: one pretty-printed object", Outcome(
        survived=rc == 0, traceback="Traceback" in err, note=err.strip()[-60:] if rc else ""))


def probe_eval(w: dict, tally: Tally) -> None:
    from dsv4.model.network import Transformer
    from dsv4.text.tokenizer import byte_tokenizer
    from dsv4.weights.checkpoint import save_to_run
    from tests.parity_utils import tiny_config

    root = w["root"] / "eval"
    model = Transformer(tiny_config(vocab_size=384))
    model.init_weights(seed=0)
    save_to_run(model, root / "run", step=1, tokenizer=byte_tokenizer())
    data = root / "notes.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 8)
    argv = ["eval", str(root / "run"), "--suite", "ppl", "--data", str(data), "--out",
            str(root / "out"), "--dtype", "fp32", "--context", "256", "--no-progress"]
    run(argv)
    data.write_text("a different text altogether, with other words\n" * 8)
    rc, _, err = run(argv)
    tally.add("eval", "the data file changed, same command", judge_error(rc, err,
                                                                         "data_fingerprint"))
    run([*argv, "--fresh"])
    model.init_weights(seed=1)
    save_to_run(model, root / "run", step=2, tokenizer=byte_tokenizer())
    rc, _, err = run(argv)
    tally.add("eval", "the checkpoint behind the run path changed", judge_error(rc, err,
                                                                               "weights"))


def probe_cli(w: dict, tally: Tally) -> None:
    model = ["--config", str(w["config"]), "--random", "--dtype", "fp32", "--threads", "1",
             "--temperature", "0"]
    rc, out, err = run(["generate", *model], stdin=b"def \xff\xfe")
    tally.add("cli", "non-UTF-8 standard input", judge_error(rc, err, "standard input", 2))
    rc, out, err = run(["generate", *model, b"caf\xe9"])
    tally.add("cli", "non-UTF-8 PROMPT argument", judge_error(rc, err, "PROMPT", 2))
    rc, out, err = run(["generate", *model, "--context", "64", "z" * 100_000])
    outcome = judge_error(rc, err, "100001 tokens", 2)
    outcome.unclear |= "zzzz" in out + err
    tally.add("cli", "an over-long prompt (not echoed)", outcome)
    for command in ("generate", "chat"):
        proc = dsv4_popen([command, *model, "--max-tokens", "200", "--context", "4096",
                           *(["hello"] if command == "generate" else [])])
        if command == "chat":
            proc.stdin.write(b"hello\n")
            proc.stdin.flush()
        else:
            proc.stdout.read(5)  # the echoed prompt
        proc.stdout.read(1)
        proc.send_signal(signal.SIGINT)
        if command == "chat":
            proc.stdin.write(b"and then?\n/exit\n")
            proc.stdin.flush()
        out, err = proc.communicate(timeout=600)
        err = err.decode()
        kept = proc.returncode == 0 and "[reply stopped" in err if command == "chat" else \
            proc.returncode == 130 and "stopped by Ctrl-C" in err
        tally.add("cli", f"Ctrl-C in {command}", Outcome(
            survived=kept, traceback="Traceback" in err, note=f"exit {proc.returncode}"))


# ---- the server -------------------------------------------------------------------------------
class Server:
    HEADER_TIMEOUT = 2.0

    def __init__(self, w: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv4", "serve", "--config", str(w["config"]), "--random",
             "--port", "0", "--served-model-name", "tiny", "--dtype", "fp32", "--threads", "1",
             "--max-batch", "8",
             "--max-queue", "64", "--context", "4096", "--header-timeout",
             str(self.HEADER_TIMEOUT), "--log-level", "error"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        match = re.search(r"http://([\d.]+):(\d+)/v1", line)
        if not match:
            raise SystemExit(f"dsv4 serve did not start: {line!r} {self.proc.stderr.read()}")
        self.host, self.port = match.group(1), int(match.group(2))
        self.slowest_health = 0.0

    def rss(self) -> int:
        """Resident bytes once the last request's clean-up ran: the server frees and trims
        after the response is sent, so a client reading right away races it."""
        time.sleep(0.5)
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def request(self, method: str, path: str, body: bytes | None = None,
                chunked: bool = False, timeout: float = 600) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            if chunked:
                body = iter([body[i:i + 2**16] for i in range(0, len(body), 2**16)])
            conn.request(method, path, body=body, encode_chunked=chunked,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw.startswith(b"{") else {}
        except (ConnectionError, http.client.HTTPException) as err:
            return 0, {"error": {"message": str(err)}}
        finally:
            conn.close()

    def health(self) -> float:
        start = time.perf_counter()
        status, _ = self.request("GET", "/health", timeout=60)
        took = time.perf_counter() - start
        return took if status == 200 else float("inf")

    def watched(self, call) -> tuple[object, float]:
        """Run `call()` while another thread asks /health every 0.1 s; the slowest answer."""
        done, slowest = threading.Event(), [0.0]

        def watch() -> None:
            while not done.is_set():
                slowest[0] = max(slowest[0], self.health())
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            result = call()
        finally:
            done.set()
            watcher.join()
        self.slowest_health = max(self.slowest_health, slowest[0])
        return result, slowest[0]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def api_outcome(result: tuple[int, dict], status: int, must: str) -> Outcome:
    got, body = result
    message = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
    return Outcome(survived=got == status, wrong=200 <= got < 300 and status >= 400,
                   unclear=must not in message, note=f"{got}: {message[:60]}")


def probe_server(w: dict, tally: Tally) -> dict:
    server = Server(w)
    post = lambda body, chunked=False: server.request(  # noqa: E731
        "POST", "/v1/completions", json.dumps(body).encode(), chunked=chunked)
    post({"model": "tiny", "prompt": "warm up", "max_tokens": 4})  # a served request, one
    post({"model": "tiny", "prompt": "warm up", "max_tokens": 0, "echo": True, "logprobs": 1})
    baseline, worst_rss = server.rss(), 1.0
    print(f"  server idle RSS after two ordinary requests: {baseline / 2**20:.0f} MiB")
    huge = {"model": "tiny", "prompt": "x" * 55_000_000, "max_tokens": 1}
    probes = [
        ("a 55 MB prompt body", lambda: post(huge), 413, "--max-body-bytes"),
        ("a 55 MB chunked body (no Content-Length)", lambda: post(huge, chunked=True), 413,
         "--max-body-bytes"),
        ("a 7 MB text prompt", lambda: post({"model": "tiny", "prompt": "y" * 7_000_000}),
         400, "prompt"),
        ("a million token ids", lambda: post({"model": "tiny", "prompt": [5] * 1_000_000}),
         400, "prompt"),
        ("scoring 4096 tokens (the limit)", lambda: post(
            {"model": "tiny", "prompt": [0] + [5] * 4095, "max_tokens": 0, "echo": True,
             "logprobs": 1}), 200, ""),
        ("scoring 4097 tokens", lambda: post(
            {"model": "tiny", "prompt": [0] * 4097, "max_tokens": 0, "echo": True,
             "logprobs": 1}), 400, "--max-score-tokens"),
        ("a lone surrogate \\ud800", lambda: server.request(
            "POST", "/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}'), 400,
         "prompt"),
        ("JSON nested 100k deep", lambda: server.request(
            "POST", "/v1/completions",
            b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
         "nest"),
        ("5 prompts x n=16 over 8 slots + 64 queued", lambda: post(
            {"model": "tiny", "prompt": ["a"] * 5, "n": 16, "max_tokens": 1}), 400, "n:"),
    ]
    for name, call, status, must in probes:
        result, slowest = server.watched(call)
        outcome = api_outcome(result, status, must)
        resident = server.rss()
        rss = resident / baseline
        worst_rss = max(worst_rss, rss)
        outcome.note = (f"/health {slowest:.2f} s, RSS {resident / 2**20:.0f} MiB "
                        f"({rss:.2f}x); {outcome.note}")
        tally.add("server", name, outcome)

    worst_rss = max(worst_rss, probe_malformed(server, tally, baseline))
    worst_rss = max(worst_rss, probe_streams_left(server, tally, baseline))

    before = server_stats(server)["scoring_cancelled"]
    body = json.dumps({"model": "tiny", "prompt": [0] + [5] * 4095, "max_tokens": 0,
                       "echo": True, "logprobs": 1}).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)
    for _ in range(600):
        stats = server_stats(server)
        if stats["scoring_waiting"] == 0:
            break
        time.sleep(0.1)
    tally.add("server", "the client leaves while its prompt is scored", Outcome(
        survived=stats["scoring_cancelled"] == before + 1,
        note=f"scoring stopped: {stats['scoring_cancelled'] - before}"))

    sockets = [socket.create_connection((server.host, server.port)) for _ in range(40)]
    for sock in sockets[20:]:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    time.sleep(server.HEADER_TIMEOUT * 2)
    closed = sum(is_closed(sock) for sock in sockets)
    for sock in sockets:
        sock.close()
    tally.add("server", "20 idle + 20 slow-header connections", Outcome(
        survived=closed == 40, note=f"{closed} of 40 closed after {2 * server.HEADER_TIMEOUT:g} s"))

    times: dict[int | None, float] = {}
    for logprobs in (None, 1, None, 1):  # alternated, best of two: the machine is shared
        took = stream_seconds(server, logprobs)
        times[logprobs] = min(times.get(logprobs, took), took)
    plain, with_logprobs = times[None], times[1]
    ratio = with_logprobs / plain
    tally.add("server", "streaming 800 tokens with logprobs", Outcome(
        survived=ratio < 2, note=f"{with_logprobs:.1f} s vs {plain:.1f} s without ({ratio:.2f}x)"))
    alive = server.health() < float("inf")
    err = server.stop()
    tracebacks = err.count("Traceback")
    if tracebacks or not alive:
        tally.add("server", "server log after all probes", Outcome(
            survived=alive, traceback=bool(tracebacks), note=f"{tracebacks} tracebacks"))
    return {"slowest_health_s": server.slowest_health, "worst_rss_ratio": worst_rss}


# Malformed bodies: (name, path, raw body, what the error message must name); all are 400s
# but the unknown model (404).
CHAT = "/v1/chat/completions"
HI = '"messages": [{"role": "user", "content": "hi"}]'
MALFORMED = [
    ("JSON cut short", "", b'{"model": "tiny", "prompt": "ab', "not valid JSON"),
    ("a JSON list as the body", "", b"[1, 2]", "JSON object"),
    ("bad UTF-8 in the body", "", b'{"model": "tiny", "prompt": "caf\xe9"}', "utf-8"),
    ("temperature NaN", "", b'{"model": "tiny", "prompt": "a", "temperature": NaN}',
     "temperature"),
    ("top_p Infinity", "", b'{"model": "tiny", "prompt": "a", "top_p": Infinity}', "top_p"),
    ("max_tokens -1", "", b'{"model": "tiny", "prompt": "a", "max_tokens": -1}', "max_tokens"),
    ("max_tokens 'ten'", "", b'{"model": "tiny", "prompt": "a", "max_tokens": "ten"}',
     "max_tokens"),
    ("n = 10**30", "", b'{"model": "tiny", "prompt": "a", "n": 1' + b"0" * 30 + b"}", "n:"),
    ("token id 999999", "", b'{"model": "tiny", "prompt": [999999]}', "999999"),
    ("token id -1", "", b'{"model": "tiny", "prompt": [-1]}', "-1"),
    ("token id 10**30", "", b'{"model": "tiny", "prompt": [1' + b"0" * 30 + b"]}", "prompt"),
    ("an empty prompt", "", b'{"model": "tiny", "prompt": ""}', "prompt"),
    ("logprobs 1000", "", b'{"model": "tiny", "prompt": "a", "logprobs": 1000}', "logprobs"),
    ("1000 stop strings", "", json.dumps({"model": "tiny", "prompt": "a",
                                          "stop": ["x"] * 1000}).encode(), "stop"),
    ("seed 10**30", "", b'{"model": "tiny", "prompt": "a", "seed": 1' + b"0" * 30 + b"}",
     "seed"),
    ("an unknown model", "", b'{"model": "nope", "prompt": "a"}', "nope"),
    ("chat: a message without a role", CHAT, b'{"model": "tiny", "messages": [{"content": 1}]}',
     "role"),
    ("chat: content a number", CHAT,
     b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', "content"),
    ("chat: messages a string", CHAT, b'{"model": "tiny", "messages": "hi"}', "messages"),
    ("chat: a tool without a function", CHAT,
     b'{"model": "tiny", ' + HI.encode() + b', "tools": [{"x": 1}]}', "tools"),
]
# Malformed HTTP: answered 400 by the HTTP layer (no JSON body to judge), connection closed.
RAW = [
    ("Content-Length: abc", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc"
     b"\r\n\r\n{}"),
    ("a 1 MB header line", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 2**20 +
     b"\r\n\r\n"),
    ("a control byte in the method", b"FOO\x01 / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("an HTTP/0.9 request line", b"GET /health\r\n\r\n"),
    ("Content-Length with Transfer-Encoding", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("a chunk size that is not hex", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
]


def probe_malformed(server: Server, tally: Tally, baseline: int) -> float:
    for name, path, body, must in MALFORMED:
        result = server.request("POST", path or "/v1/completions", body)
        outcome = api_outcome(result, 404 if must == "nope" else 400, must)
        tally.add("server", name, outcome)
    for name, raw in RAW:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.settimeout(30)
            try:
                sock.sendall(raw)
                head = sock.recv(200)
            except OSError as err:
                head = str(err).encode()
        tally.add("server", name, Outcome(survived=head.startswith(b"HTTP/1.1 400"),
                                          note=head.split(b"\r\n")[0].decode("latin-1")))
    rss = server.rss() / baseline
    print(f"  after the malformed requests: /health {server.health():.2f} s, RSS {rss:.2f}x")
    return rss


def probe_streams_left(server: Server, tally: Tally, baseline: int, clients: int = 40) -> float:
    """`clients` streams at once over 8 slots; every other client leaves after its first
    chunk. Then every slot must be free and greedy output unchanged."""
    body = {"model": "tiny", "prompt": "def main():", "max_tokens": 12, "temperature": 0}
    _, before = server.request("POST", "/v1/completions", json.dumps(body).encode())
    stream = json.dumps({**body, "max_tokens": 200, "stream": True, "ignore_eos": True}).encode()

    def client(leave: bool) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
        conn.request("POST", "/v1/completions", body=stream,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read(1) if leave else response.read()
        conn.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(clients)]
    _, slowest = server.watched(lambda: [t.start() for t in threads] + [t.join() for t in threads])
    for _ in range(600):
        stats = server_stats(server)
        if stats["running"] == stats["waiting"] == stats["cache_tokens_used"] == 0:
            break
        time.sleep(0.1)
    _, after = server.request("POST", "/v1/completions", json.dumps(body).encode())
    same = before["choices"][0]["text"] == after["choices"][0]["text"]
    rss = server.rss() / baseline
    tally.add("server", f"{clients} streams at once, {clients // 2} clients leaving", Outcome(
        survived=stats["running"] == stats["cache_tokens_used"] == 0, wrong=not same,
        note=f"/health {slowest:.2f} s, RSS {rss:.2f}x; slots in use after: {stats['running']}"
             f", greedy output {'unchanged' if same else 'CHANGED'}"))
    return rss


def server_stats(server: Server) -> dict:
    return server.request("GET", "/health")[1]


def is_closed(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def stream_seconds(server: Server, logprobs: int | None) -> float:
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 800, "temperature": 0,
            "stream": True, "ignore_eos": True, "logprobs": logprobs}
    start = time.perf_counter()
    server.request("POST", "/v1/completions", json.dumps(body).encode())
    return time.perf_counter() - start


# ---- the table ----------------------------------------------------------------------------------
def print_totals(tally: Tally, server: dict | None) -> None:
    header = ["class", "faults", "survived", "data lost", "wrong results", "unclear messages",
              "tracebacks"]
    rows = []
    for cls, items in tally.rows.items():
        outcomes = [o for _, o in items]
        rows.append([cls, len(outcomes), sum(o.survived for o in outcomes),
                     sum(o.lost for o in outcomes), sum(o.wrong for o in outcomes),
                     sum(o.unclear for o in outcomes), sum(o.traceback for o in outcomes)])
    rows.append(["total", *[sum(r[i] for r in rows) for i in range(1, len(header))]])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    if server:
        print(f"\nserver: slowest /health during any probe {server['slowest_health_s']:.2f} s "
              f"(target < 1 s); largest RSS after a probe {server['worst_rss_ratio']:.2f}x the "
              "idle baseline (target <= 1.2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=CLASSES, default=list(CLASSES))
    parser.add_argument("--kills", type=int, default=5, metavar="N",
                        help="kill -9 per chain (one mid-run, one inside checkpoint writes; "
                        "each adds ~15 s; default 5)")
    args = parser.parse_args()
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        tally = Tally(root=tmp)
        world = make_world(Path(tmp))
        for cls in args.only:
            print(f"{cls} ...", flush=True)
            extra = (args.kills,) if cls == "train" else ()
            result = globals()[f"probe_{cls}"](world, tally, *extra)
            if cls == "server":
                server = result
    print_totals(tally, server)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
