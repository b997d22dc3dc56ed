"""Hostile input and bad days: re-run the probe classes of issue 18 and print the totals.

    python bench/hostile.py                 # everything, a few minutes on 2 CPU cores
    python bench/hostile.py --only server   # one class: train, weights, data, eval, cli, server

Every probe runs the real `dsv4` command in a child process (a tiny random-weight model, a
small corpus of stdlib modules, a loopback server), injects one fault and checks what a user
would see and keep:

* train    a full disk (ENOSPC injected at the write call) in a metrics append, in
           trainer.pt, in a checkpoint shard; a torn metrics line; kill -9 mid-run and inside
           checkpoint writes; two processes on one run; temp debris; binary / escaping `latest`
* weights  NaN, inf, a flipped exponent bit, an out-of-range tid2eid, a truncated shard
* data     bad UTF-8 past 64 KiB of a JSONL, a pretty-printed .json object, an empty file
* eval     the checkpoint behind the same path changed; the data file changed
* cli      non-UTF-8 stdin and argv, an over-long prompt, Ctrl-C in generate and in chat
* server   55 MB bodies (sized and chunked), a 7 MB text prompt, a million token ids, lone
           surrogates, 100k-deep JSON, what can never fit, prompt scoring at the limit and
           over it, a client leaving mid-scoring, 20 idle + 20 slow-header connections,
           streamed logprobs (800 tokens) against plain streaming

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
def probe_train(w: dict, tally: Tally) -> None:
    base = w["root"] / "train"
    for name, match, after, must in [("ENOSPC in a metrics.jsonl append", "metrics.jsonl", 20,
                                      "metrics.jsonl"),
                                     ("ENOSPC writing trainer.pt", "trainer.pt", 1000,
                                      "trainer.pt"),
                                     ("ENOSPC writing a checkpoint shard", ".shard-", 1000,
                                      "step_000003")]:
        run_dir = base / name.split()[-1].replace(".", "_")
        run(train_args(w, run_dir, "--steps", "2"))
        rc, _, err = run(train_args(w, run_dir, "--resume", "--steps", "3"),
                         disk_full_at=match, after=after)
        outcome = judge_error(rc, err, must)
        ok, whole = resumes(w, run_dir, 4)
        outcome.survived &= ok
        outcome.lost = not whole
        tally.add("train", name, outcome)

    run_dir = base / "torn"
    run(train_args(w, run_dir, "--steps", "2"))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.')
    rc, out, err = run(train_args(w, run_dir, "--resume", "--steps", "3"))
    tally.add("train", "a torn last metrics line, then --resume", Outcome(
        survived=rc == 0, lost=steps_of(run_dir) != [1, 2, 3],
        unclear="torn last line" not in out, traceback="Traceback" in err))

    for name, wait_for in [("kill -9 mid-run", "metrics"), ("kill -9 inside a checkpoint write",
                                                            "tmp")]:
        for attempt in range(2):
            run_dir = base / f"kill-{wait_for}-{attempt}"
            proc = dsv4_popen(train_args(w, run_dir, "--steps", "30"))
            hit = wait_and_kill(proc, run_dir, wait_for)
            ok, whole = resumes(w, run_dir, 6)
            tally.add("train", f"{name} ({hit})", Outcome(survived=ok, lost=not whole))

    run_dir = base / "locked"
    run(train_args(w, run_dir, "--steps", "1"))
    first = dsv4_popen(train_args(w, run_dir, "--resume", "--steps", "8"))
    time.sleep(1.0)  # let the first one take the lock (it holds it for the whole run)
    rc, _, err = run(train_args(w, run_dir, "--resume", "--steps", "8"))
    first.communicate(timeout=600)
    outcome = judge_error(rc, err, str(run_dir))
    outcome.lost = steps_of(run_dir) != list(range(1, 9))
    tally.add("train", "two --resume on one run folder", outcome)

    run_dir = base / "debris"
    run(train_args(w, run_dir, "--steps", "1"))
    (run_dir / "checkpoints" / ".step_000002.x.tmp").mkdir()
    (run_dir / "checkpoints" / ".step_000002.x.tmp" / "part").write_bytes(b"\0" * 2**20)
    (run_dir / "checkpoints" / ".latest.y.tmp").write_text("step_000002")
    rc, out, err = run(train_args(w, run_dir, "--resume", "--steps", "2"))
    left = [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    tally.add("train", "temp debris of killed writes, then --resume", Outcome(
        survived=rc == 0 and not left, unclear="removed 2 temporary" not in out,
        traceback="Traceback" in err, note=f"{len(left)} left"))

    for name, content in [("binary bytes in checkpoints/latest", b"\x00\xff\xfe\x81"),
                          ("latest = ../../x (outside the run)", b"../../x\n")]:
        run_dir = base / ("binary" if b"\x00" in content else "escape")
        run(train_args(w, run_dir, "--steps", "1"))
        (run_dir / "checkpoints" / "latest").write_bytes(content)
        rc, _, err = run(["generate", "--run", str(run_dir), "hi", "--max-tokens", "1"])
        tally.add("train", name, judge_error(rc, err, "latest", want_rc=2))


def wait_and_kill(proc: subprocess.Popen, run_dir: Path, wait_for: str) -> str:
    """kill -9 once the run logged a step (or a checkpoint write is under way), after its
    first checkpoint (before it, there is nothing to resume: a new run starts over)."""
    deadline = time.monotonic() + 300
    checkpoints = run_dir / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        if not (checkpoints / "latest").is_file():
            time.sleep(0.005)
            continue
        if wait_for == "metrics" and len(steps_of(run_dir)) >= 2:
            break
        if wait_for == "tmp" and any(p.name.endswith(".tmp") for p in checkpoints.iterdir()):
            break
        time.sleep(0.005)
    writing = (run_dir / "checkpoints").is_dir() and any(
        p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return "during a write" if writing else "between writes"


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
             ("a truncated shard", None, b"")]
    for name, tensor, value in cases:
        model = Transformer(tiny_config(vocab_size=384))
        model.init_weights(seed=0)
        folder = dsv4.save(model, w["root"] / "weights" / name.replace(" ", "_"))
        if tensor is None:
            file = folder / "model.safetensors"
            file.write_bytes(file.read_bytes()[:-1000])
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
    root = w["root"] / "bad-data"
    root.mkdir()
    good = "".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(1000))
    (root / "deep.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    (root / "pretty.json").write_text(json.dumps({"text": "def f():\n    return 1\n" * 50},
                                                 indent=2))
    (root / "empty.txt").write_text("")
    for name, must in [("deep.jsonl", "deep.jsonl:1001"), ("empty.txt", "empty.txt")]:
        rc, _, err = run(train_args(w, root / f"run-{name}", "--data", str(w["data"]),
                                    str(root / name), "--steps", "1"))
        tally.add("data", f"{name}: {'bad UTF-8 past 64 KiB' if 'deep' in name else 'empty'}",
                  judge_error(rc, err, must, want_rc=2))
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
        rss = server.rss() / baseline
        worst_rss = max(worst_rss, rss)
        outcome.note = (f"/health {slowest:.2f} s, RSS {server.rss() / 2**20:.0f} MiB "
                        f"({rss:.2f}x); {outcome.note}")
        tally.add("server", name, outcome)

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
    args = parser.parse_args()
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        tally = Tally(root=tmp)
        world = make_world(Path(tmp))
        for cls in args.only:
            print(f"{cls} ...", flush=True)
            result = globals()[f"probe_{cls}"](world, tally)
            if cls == "server":
                server = result
    print_totals(tally, server)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()
