"""The server's event translation on real token streams: a known V4 completion (reasoning,
content, a DSML tool-call block, EOS) tokenized and fed one engine event per token, the way the
scheduler delivers them. Streamed deltas never carry markup, and add up to the one-shot parse."""

from __future__ import annotations

import json

import pytest

from dsv4.inference.engine import Event
from dsv4.server.choices import ChatChoice, TextChoice
from dsv4.text.chat import EOS, parse_completion
from dsv4.text.tokenizer import byte_tokenizer, train_bpe

CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris, "FR"</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
COMPLETIONS = {
    "tool call after thinking": (True, "The user wants weather: call the tool.</think>"
                                       "Let me check." + CALL),
    "tool call, no thinking": (False, "Checking <now>." + CALL),
    "plain answer": (True, "Short thought, é ünïcode 🙂.</think>The answer is 4."),
}
MARKUP = ("｜", "<think>", "</think>", "DSML", "tool_calls", "invoke")


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def tokenizer(request):
    if request.param == "bytes":
        return byte_tokenizer()
    corpus = [text for _, text in COMPLETIONS.values()] * 20
    return train_bpe(corpus, vocab_size=400, show_progress=False)


def events_of(tokens: list[int], reason: str = "stop", stop_token: int | None = 1) -> list[Event]:
    events = [Event(0, token) for token in tokens]
    return events + [Event(0, None, finished=True, finish_reason=reason, stop_token=stop_token)]


@pytest.mark.parametrize("name", list(COMPLETIONS))
def test_streamed_chat_deltas_equal_the_one_shot_parse_without_markup(tokenizer, name) -> None:
    thinking, text = COMPLETIONS[name]
    choice = ChatChoice(tokenizer, [], thinking, call_id_prefix="call_")
    deltas = []
    for event in events_of(tokenizer.encode(text)):
        deltas += choice.add(event)
    for delta in deltas:
        for key in ("content", "reasoning_content"):
            assert not any(mark in delta.get(key, "") for mark in MARKUP), delta
        for call in delta.get("tool_calls", []):
            json.loads(call["function"]["arguments"])  # complete arguments, never a fragment
            assert not any(mark in call["function"]["arguments"] for mark in MARKUP)
    want = parse_completion(text, thinking=thinking)
    assert "".join(d.get("content", "") for d in deltas) == want["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (
        want["reasoning_content"] or "")
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == list(range(len(want["tool_calls"])))
    assert [{k: v for k, v in c.items() if k != "index"} for c in calls] == want["tool_calls"]
    message = choice.message()
    assert message["tool_calls" if calls else "content"] == (want["tool_calls"] if calls
                                                             else want["content"])
    assert choice.finish_reason == ("tool_calls" if calls else "stop")
    assert choice.text.tokens == tokenizer.encode(text)


def test_tool_call_arguments_arrive_whole_and_parsed() -> None:
    tokenizer = byte_tokenizer()
    choice = ChatChoice(tokenizer, [], True, call_id_prefix="call_")
    deltas = []
    for event in events_of(tokenizer.encode(COMPLETIONS["tool call after thinking"][1])):
        deltas += choice.add(event)
    (call,) = [c for d in deltas for c in d.get("tool_calls", [])]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": 'Paris, "FR"', "days": [1, 2]}
    assert choice.message()["content"] == "Let me check."


def test_a_completion_cut_by_the_length_limit_leaks_nothing() -> None:
    """Truncated inside the tool-call block: no half tag reaches content, no call is sent."""
    tokenizer = byte_tokenizer()
    text = COMPLETIONS["tool call after thinking"][1]
    cut = text.index("Paris")
    choice = ChatChoice(tokenizer, [], True, call_id_prefix="call_")
    deltas = []
    for event in events_of(tokenizer.encode(text[:cut]), reason="length", stop_token=None):
        deltas += choice.add(event)
    assert all("tool_calls" not in d for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    assert choice.finish_reason == "length"
    assert any("cut off by the length limit" in p for p in choice.problems)


def test_stop_strings_never_reach_the_client_even_in_part() -> None:
    tokenizer = byte_tokenizer()
    choice = TextChoice(tokenizer, ["STOP", "\n\n"])
    pieces = [choice.add(Event(0, t)) for t in tokenizer.encode("abc STO")]
    assert "".join(pieces) == "abc "  # "STO" could still become "STOP": held back
    pieces += [choice.add(Event(0, t)) for t in tokenizer.encode("P and more")]
    pieces.append(choice.add(Event(0, None, finished=True, finish_reason="stop")))
    assert "".join(pieces) == "abc " and choice.text == "abc "
    assert choice.finish_reason == "stop"
    # A held-back prefix that does not complete a stop string is released.
    choice = TextChoice(tokenizer, ["STOP"])
    out = "".join(choice.add(Event(0, t)) for t in tokenizer.encode("x ST"))
    out += choice.add(Event(0, None, finished=True, finish_reason="length"))
    assert out == "x ST" and choice.finish_reason == "length"


def test_multibyte_characters_are_never_split() -> None:
    tokenizer = byte_tokenizer()
    choice = TextChoice(tokenizer, [])
    pieces = [choice.add(Event(0, t)) for t in tokenizer.encode("é🙂")]
    assert pieces == ["", "é", "", "", "", "🙂"]
    assert choice.add(Event(0, None, finished=True, finish_reason="stop")) == ""
    assert EOS not in choice.text


def test_streamed_tool_call_chunks_read_by_the_openai_types() -> None:
    """The server's SSE chunks for a reasoning + content + tool-call completion, read back with
    the `openai` package's own chunk type: reasoning, content and one complete tool call, no
    markup anywhere, finish_reason "tool_calls"."""
    import asyncio
    import contextlib

    from openai.types.chat import ChatCompletionChunk
    from starlette.requests import Request

    from dsv4.inference.engine import Engine
    from dsv4.model.network import Transformer
    from dsv4.server.app import ChatJob, Server, stream_chat
    from dsv4.server.protocol import parse_chat_request
    from dsv4.server.scheduler import Handle
    from tests.parity_utils import randomize, tiny_config

    tokenizer = byte_tokenizer()
    model = randomize(Transformer(tiny_config(vocab_size=288)), seed=1).eval()
    server = Server(Engine(model, max_batch=1, capacity=2048), tokenizer, "tiny", max_queue=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    parsed = parse_chat_request({"model": "tiny", "stream": True, "reasoning_effort": "high",
                                 "tools": tools,
                                 "messages": [{"role": "user", "content": "Weather?"}]}, "tiny")
    job = ChatJob(server, parsed)
    text = COMPLETIONS["tool call after thinking"][1]

    async def chunks() -> list[str]:
        handle = Handle(asyncio.get_running_loop())
        for event in events_of(tokenizer.encode(text)):
            handle.queue.put_nowait((0, event))
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
        stream = stream_chat(server, request, job, handle, [False], contextlib.AsyncExitStack())
        return [piece async for piece in stream]

    pieces = asyncio.run(chunks())
    assert pieces[-1] == "data: [DONE]\n\n"
    parsed_chunks = [ChatCompletionChunk.model_validate(json.loads(p.removeprefix("data: ")))
                     for p in pieces[:-1]]
    deltas = [c.choices[0].delta for c in parsed_chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    want = parse_completion(text, thinking=True)
    assert (reasoning, content) == (want["reasoning_content"], want["content"])
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": 'Paris, "FR"', "days": [1, 2]}
    assert not any(mark in reasoning + content for mark in MARKUP)
    assert parsed_chunks[-1].choices[0].finish_reason == "tool_calls"
    assert deltas[0].role == "assistant"


def test_an_unparseable_tool_call_is_shown_as_content_with_its_problems() -> None:
    """A call without a tool name cannot be returned: the client sees its text, not nothing."""
    tokenizer = byte_tokenizer()
    broken = ('<｜DSML｜invoke>\n<｜DSML｜parameter name="q" string="true">x</｜DSML｜parameter>\n'
              "</｜DSML｜invoke>")
    text = (f'\n\n<｜DSML｜tool_calls>\n{broken}\n<｜DSML｜invoke name="ok">\n</｜DSML｜invoke>\n'
            "</｜DSML｜tool_calls>")
    choice = ChatChoice(tokenizer, [], False, call_id_prefix="call_")
    deltas = []
    for event in events_of(tokenizer.encode(text)):
        deltas += choice.add(event)
    assert "".join(d.get("content", "") for d in deltas) == broken
    assert [c["function"]["name"] for c in choice.message()["tool_calls"]] == ["ok"]
    assert choice.finish_reason == "tool_calls"
    assert "an invoke with the invalid tool name '' was not parsed" in choice.problems
