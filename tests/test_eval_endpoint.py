"""`dsv4 eval --endpoint`: retries, servers without log-probabilities (a minimal stand-in server
that behaves like many hosted APIs), and the real `dsv4 serve` in a subprocess compared with the
same model evaluated in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dsv4.evaluate.backends import EvalError, LogprobsUnavailable
from dsv4.evaluate.endpoint import EndpointBackend, EndpointError, api_base
from dsv4.evaluate.report import format_table
from dsv4.evaluate.run import EvalOptions, evaluate


class NoLogprobsServer(BaseHTTPRequestHandler):
    """Chat and completions that always answer "B"; echo/logprobs requests get a 400, as from
    APIs without prompt log-probabilities; the first `fail_first` requests get a 503."""

    fail_first = 0
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append({"path": self.path, **body})
        if len(cls.requests) <= cls.fail_first:
            return self.reply(503, {"error": {"message": "overloaded, try again"}})
        if body.get("model") != "stub":
            return self.reply(404, {"error": {"message": f"model {body.get('model')} not found"}})
        if self.path.endswith("/completions") and "chat" not in self.path:
            if body.get("echo"):
                return self.reply(400, {"error": {"message": "echo is not supported"}})
            return self.reply(200, {"id": "c", "object": "text_completion", "created": 0,
                                    "model": "stub", "choices": [
                                        {"index": 0, "text": " B\nmore", "finish_reason": "stop",
                                         "logprobs": None}]})
        return self.reply(200, {"id": "c", "object": "chat.completion", "created": 0,
                                "model": "stub", "choices": [{
                                    "index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "B"}}]})

    def reply(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def stub_url():
    NoLogprobsServer.fail_first = 0
    NoLogprobsServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoLogprobsServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def mc_file(folder: Path) -> str:
    path = folder / "mc.jsonl"
    rows = [{"question": f"Q{i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_api_base() -> None:
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(EvalError, match="'h:8000'"):
        api_base("h:8000")


def test_retries_server_errors_then_succeeds(stub_url) -> None:
    NoLogprobsServer.fail_first = 2
    backend = EndpointBackend(stub_url, "stub", retries=2, backoff=0.001)
    assert backend.complete(["Answer:"], 4, ["\n"]) == [" B"]
    assert len(NoLogprobsServer.requests) == 3
    NoLogprobsServer.requests, NoLogprobsServer.fail_first = [], 5
    with pytest.raises(EndpointError, match="InternalServerError after 3 attempts"):
        backend.complete(["Answer:"], 4)


def test_client_errors_are_final_and_named(stub_url) -> None:
    backend = EndpointBackend(stub_url, "other", retries=3, backoff=0.001)
    with pytest.raises(EndpointError, match="HTTP 404: model other not found"):
        backend.chat([[{"role": "user", "content": "hi"}]], "none", 4)
    assert len(NoLogprobsServer.requests) == 1


def test_without_logprobs_mc_skips_loglikelihood_and_says_why(stub_url, tmp_path) -> None:
    backend = EndpointBackend(stub_url, "stub", concurrency=3)
    opts = EvalOptions(data=[mc_file(tmp_path)], shots=1)
    results = evaluate(backend, "mc", tmp_path / "out", opts)
    assert results["scorings"] == ["generate"] and "acc" not in results["summary"]
    assert results["summary"]["em"] == 1 / 4  # always "B": right for answer 1 of items 1..4
    (skip,) = results["skipped"]
    assert skip["metric"] == "letter log-likelihood" and "echo is not supported" in skip["reason"]
    assert "skipped: " in format_table(results)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["skipped"] == results["skipped"]
    with pytest.raises(EvalError, match="--scoring letter needs log-probabilities"):
        evaluate(backend, "mc", tmp_path / "o2", EvalOptions(data=opts.data, shots=1,
                                                            scoring=["letter"]))
    with pytest.raises(EvalError, match="the ppl suite needs log-probabilities"):
        evaluate(backend, "ppl", tmp_path / "o3", EvalOptions(data=opts.data))
    with pytest.raises(LogprobsUnavailable):
        backend.text_logprob("hello")


def test_chat_mode_sends_messages_and_reasoning_effort(stub_url, tmp_path) -> None:
    backend = EndpointBackend(stub_url, "stub")
    opts = EvalOptions(data=[mc_file(tmp_path)], shots=1, scoring=["generate"], think="high")
    assert evaluate(backend, "mc", tmp_path, opts)["summary"]["em"] == 1 / 4
    request = NoLogprobsServer.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["reasoning_effort"] == "high"
    assert request["thinking"] == {"type": "enabled"}
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]


# ---------------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------------


def _server_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dsv4.server.app") is not None


needs_server = pytest.mark.skipif(not _server_available(),
                                  reason="dsv4 serve is missing (no dsv4.server.app)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`dsv4 serve` of a random nano (fp32) on a free loopback port; yields its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsv4", "serve", "--preset", "nano", "--random", "--dtype",
             "fp32", "--port", str(port), "--host", "127.0.0.1", "--threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dsv4 serve exited with {proc.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dsv4 serve never became healthy: {log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def local_nano():
    """The served model, in this process: same preset, seed and dtype."""
    from dsv4.evaluate.backends import LocalBackend
    from dsv4.model.config import ModelConfig
    from dsv4.model.network import Transformer
    from dsv4.text.tokenizer import byte_tokenizer

    model = Transformer(ModelConfig.from_preset("nano"))
    model.init_weights(seed=0)
    return LocalBackend(model.float().eval(), byte_tokenizer(), "nano", capacity=2048)


def _model_id(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


@needs_server
@pytest.mark.slow
def test_served_ppl_and_mc_equal_the_local_model(served, local_nano, tmp_path) -> None:
    backend = EndpointBackend(served, _model_id(served), concurrency=4, timeout=120)
    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 8)
    opts = EvalOptions(data=[str(text)], context=2048)
    remote = evaluate(backend, "ppl", tmp_path / "remote", opts)["summary"]
    local = evaluate(local_nano, "ppl", tmp_path / "local", opts)["summary"]
    # dsv4 serve puts BOS before a text prompt and scores every text token, as we do locally
    assert remote["tokens"] == local["tokens"] == len(text.read_text())
    assert remote["nats_per_token"] == pytest.approx(local["nats_per_token"], rel=1e-3)

    mc_opts = EvalOptions(data=[mc_file(tmp_path)], shots=1, scoring=["letter", "generate"])
    remote = evaluate(backend, "mc", tmp_path / "mc_remote", mc_opts)
    local = evaluate(local_nano, "mc", tmp_path / "mc_local", mc_opts)
    items = [[json.loads(line) for line in (tmp_path / d / "items.jsonl").read_text().splitlines()]
             for d in ("mc_remote", "mc_local")]
    for r, l in zip(*items):
        assert r["letter_logprobs"] == pytest.approx(l["letter_logprobs"], abs=1e-3)
        assert r["reply"] == l["reply"]
    assert remote["summary"]["acc"] == local["summary"]["acc"]


@needs_server
@pytest.mark.slow
def test_served_niah_and_cli(served, tmp_path, capsys) -> None:
    from dsv4.cli import main

    out = tmp_path / "niah"
    code = main(["eval", "--endpoint", f"{served}/v1", "--model", _model_id(served), "--suite",
                 "niah", "--lengths", "256,512", "--depths", "0,100", "--haystack", "filler",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "skipped: needs a local dsv4 model" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 4 and len(results["summary"]["accuracy_grid"]) == 2
    assert (out / "niah.png").is_file()
