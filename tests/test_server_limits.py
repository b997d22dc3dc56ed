"""The server under hostile input: bodies too large or too slow, JSON that is not Unicode or
nests too deep, requests that can never fit, idle and slow-header connections, long prompt
scoring and streamed logprobs. A real uvicorn server on a loopback port (with the bounded
HTTP protocol `dsv4 serve` uses), driven by raw sockets, http.client and the openai client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest
import torch
import uvicorn

from dsv4.inference.engine import Engine, TextStream
from dsv4.model.network import Transformer
from dsv4.server.app import create_app
from dsv4.server.choices import token_offsets
from dsv4.server.limits import ServerLimits, bounded_protocol
from dsv4.text.tokenizer import byte_tokenizer
from tests.parity_utils import randomize, tiny_config

pytestmark = pytest.mark.slow  # a live uvicorn server

MODEL_NAME = "tiny"
CAPACITY = 512
LIMITS = ServerLimits(max_body_bytes=64 * 1024, body_timeout_s=2.0, header_timeout_s=0.5,
                      max_score_tokens=400)


class BoundedServer:
    """`create_app` served by uvicorn with `bounded_protocol`, as `dsv4 serve` runs it."""

    def __init__(self, app, limits: ServerLimits) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.host, self.port = sock.getsockname()
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level="error", http=bounded_protocol(limits.header_timeout_s)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
            assert self.thread.is_alive(), "uvicorn did not start"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.request("POST", path, json.dumps(body).encode())

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.host}:{self.port}/v1", api_key="unused",
                             max_retries=0)

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize(Transformer(tiny_config(vocab_size=288)), seed=5).eval()


@pytest.fixture(scope="module")
def live(model):
    engine = Engine(model, max_batch=4, capacity=CAPACITY, prefill_chunk=64)
    server = BoundedServer(create_app(engine, byte_tokenizer(), MODEL_NAME, max_queue=8,
                                      limits=LIMITS), LIMITS)
    yield server
    server.close()


def error_of(status_body: tuple[int, dict]) -> tuple[int, str, str]:
    status, body = status_body
    return status, body["error"]["code"], body["error"]["message"]


# ---- bodies ------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_before_it_is_read(live) -> None:
    big = json.dumps({"model": MODEL_NAME, "prompt": "x" * 200_000}).encode()
    status, code, message = error_of(live.request("POST", "/v1/completions", big))
    assert (status, code) == (413, "request_too_large") and "65,536" in message
    # without a Content-Length (chunked): counted while it arrives
    conn = http.client.HTTPConnection(live.host, live.port, timeout=60)
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 8192]
                                                       for i in range(0, len(big), 8192)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and b"request_too_large" in response.read()
    conn.close()
    assert live.health()["status"] == "ok"


def test_a_body_that_never_finishes_is_408(live) -> None:
    with socket.create_connection((live.host, live.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_text_longer_than_any_tokenization_of_the_limit_is_refused_untokenized(live) -> None:
    text = "y" * 60_000  # under the body limit; >= 60000 / (longest token's bytes) tokens
    status, code, message = error_of(live.post("/v1/completions",
                                               {"model": MODEL_NAME, "prompt": text}))
    assert (status, code) == (400, "context_length_exceeded")
    assert "60,000 bytes of text are at least" in message and "511 allowed" in message


def test_chat_text_longer_than_any_tokenization_is_refused_unencoded(live) -> None:
    messages = [{"role": "user", "content": "z" * 30_000},
                {"role": "user", "content": [{"type": "text", "text": "w" * 30_000}]}]
    status, code, message = error_of(live.post("/v1/chat/completions",
                                               {"model": MODEL_NAME, "messages": messages}))
    assert (status, code) == (400, "context_length_exceeded")
    assert "messages: 60,000 bytes of text are at least" in message


@pytest.mark.parametrize("body, where", [
    (b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt: holds a lone surrogate \\ud800"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages[0].content: holds a lone surrogate \\udfff"),
    (b'{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]: holds a lone"),
    (b'{"model": "tiny", "\\ud800": 1}', "holds a lone surrogate"),
])
def test_json_that_is_not_unicode_is_400(live, body, where) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    status, code, message = error_of(live.request("POST", path, body))
    assert (status, code) == (400, "invalid_unicode") and where in message


@pytest.mark.parametrize("depth", [30_000, LIMITS.max_json_depth + 1])
def test_deeply_nested_json_is_400(live, depth) -> None:
    body = b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    status, code, message = error_of(live.request("POST", "/v1/completions", body))
    assert (status, code) == (400, "invalid_json") and "nest" in message
    assert live.health()["status"] == "ok"


def test_what_can_never_fit_is_400_not_429(live) -> None:
    """4 slots + a queue of 8 hold 12 generations: 2 prompts x n=8 can never be admitted."""
    status, code, message = error_of(live.post("/v1/completions", {
        "model": MODEL_NAME, "prompt": ["a", "b"], "n": 8, "max_tokens": 1}))
    assert (status, code) == (400, "too_many_generations")
    assert "16 generations" in message and "at most 12" in message
    with pytest.raises(openai.BadRequestError):
        live.client().chat.completions.create(model=MODEL_NAME, n=13, max_tokens=1,
                                              messages=[{"role": "user", "content": "hi"}])
    ok = live.client().completions.create(model=MODEL_NAME, prompt=["a", "b"], n=6,
                                          max_tokens=1)
    assert len(ok.choices) == 12


# ---- connections ------------------------------------------------------------------------------
def wait_closed(sock: socket.socket, keep_sending: bytes = b"") -> bool:
    """True once the server closes the connection (recv gives EOF or a reset); sends one byte
    of `keep_sending` at a time meanwhile. The socket timeout is a deadline, not a speed."""
    sock.settimeout(0.1)
    for step in range(600):
        if keep_sending and step < len(keep_sending):
            try:
                sock.sendall(keep_sending[step: step + 1])
            except OSError:
                return True
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_idle_and_slow_header_connections_are_closed(live) -> None:
    idle = socket.create_connection((live.host, live.port))
    slow = socket.create_connection((live.host, live.port))
    try:
        assert wait_closed(idle)
        # a byte every 0.1 s: data arriving does not extend the deadline for the whole head
        assert wait_closed(slow, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 500)
    finally:
        idle.close()
        slow.close()
    # a kept-alive connection that goes quiet after a response is closed too
    conn = http.client.HTTPConnection(live.host, live.port, timeout=60)
    conn.request("GET", "/health")
    assert conn.getresponse().read()
    assert wait_closed(conn.sock)
    conn.close()
    assert live.health()["status"] == "ok"


# ---- prompt scoring and streamed logprobs -----------------------------------------------------
def test_long_prompt_scoring_goes_through_the_cache_in_chunks(live, model) -> None:
    """A 300-token prompt (5 chunks of 64) scores as one full forward does."""
    prompt = [0, *[(7 * i + 3) % 270 + 1 for i in range(299)]]
    out = live.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0,
                                           echo=True, logprobs=1)
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    expected = [float(logprobs[i - 1, t]) for i, t in enumerate(prompt) if i]
    assert out.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    too_long = [0] * (LIMITS.max_score_tokens + 1)
    status, code, message = error_of(live.post("/v1/completions", {
        "model": MODEL_NAME, "prompt": too_long, "max_tokens": 0, "echo": True,
        "logprobs": 1}))
    assert (status, code) == (400, "context_length_exceeded")
    assert "--max-score-tokens" in message


def test_scoring_stops_when_its_client_leaves(model) -> None:
    """One token per chunk: a 400-token prompt takes hundreds of scheduler turns, so the
    disconnect (noticed within half a second) comes long before the end."""
    engine = Engine(model, max_batch=2, capacity=CAPACITY, prefill_chunk=1)
    server = BoundedServer(create_app(engine, byte_tokenizer(), MODEL_NAME, limits=LIMITS),
                           LIMITS)
    try:
        body = json.dumps({"model": MODEL_NAME, "prompt": [0] + [5] * 399, "max_tokens": 0,
                           "echo": True, "logprobs": 1}).encode()
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            while server.health()["scoring_waiting"] == 0:
                time.sleep(0.02)
        for _ in range(3000):
            health = server.health()
            if health["scoring_waiting"] == 0:
                break
            time.sleep(0.02)
        assert health["scoring_cancelled"] == 1
    finally:
        server.close()


def test_streamed_logprobs_equal_the_whole_response(live) -> None:
    client = live.client()
    args = dict(model=MODEL_NAME, prompt="Stream me", max_tokens=60, temperature=0,
                logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(stream=True, **args):
        lp = chunk.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens
            values += lp.token_logprobs
            offsets += lp.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert values == pytest.approx(whole.token_logprobs)
    assert len(tokens) == 60


def test_token_offsets_match_incremental_detokenization() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("h\u00e9llo \u4e16\u754c \U0001f600!") + [300, 5]
    stream = TextStream(tokenizer)
    expected = []
    for token in ids:
        expected.append(len(stream.text))
        stream.add(token)
    assert token_offsets(tokenizer, ids) == expected
