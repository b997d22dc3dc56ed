"""The V4 chat encoding and completion parser (spec training.md §6, §3.2, §3.6; field-notes B5).

Golden prompts are written out here from the April preview encoder's published fixtures
(`encoding/tests`, reproduced by several independent ports), not from `text.chat`'s constants, so
these tests pin encoding="v4-preview". Today's official encoding ("v4", the default) is compared
with DeepSeek's own package in test_chat_official.py.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from dsv4.text import chat
from dsv4.text.chat import StreamParser, encode_chat, encode_chat_segments, parse_completion


def _preview_options(messages: list[dict], options: dict) -> dict:
    # A complete conversation (ending with an assistant turn) has no generation prompt.
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    options.setdefault("add_generation_prompt", last.get("role") != "assistant")
    return {"encoding": "v4-preview", **options}


def preview(messages: list[dict], **options) -> str:
    return encode_chat(messages, **_preview_options(messages, options))


def preview_segments(messages: list[dict], **options) -> list[tuple[str, bool]]:
    return encode_chat_segments(messages, **_preview_options(messages, options))


BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a specific location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                 "description": "Temperature unit"}},
        "required": ["location"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web for information",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "Search query"},
        "num_results": {"type": "integer", "description": "Number of results to return"}},
        "required": ["query"]}}}

# The "## Tools" section as the official encoder writes it: head, one JSON schema per line, tail.
TOOLS_HEAD = (
    '\n\n## Tools\n\nYou have access to a set of tools to help answer the user\'s question. '
    'You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:\n\n'
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE'
    '</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name="$TOOL_NAME2">\n...\n'
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n'
    'String parameters should be specified as is and set `string="true"`. For all other types '
    '(numbers, booleans, arrays, objects), pass the value in JSON format and set '
    '`string="false"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output '
    'your complete reasoning inside <think>...</think> BEFORE any tool calls or final '
    'response.\n\nOtherwise, output directly after </think> with tool calls or final response.'
    '\n\n### Available Tool Schemas\n\n'
)
TOOLS_TAIL = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas "
              "to invoke tool calls.\n")
TOOLS_SECTION = TOOLS_HEAD + (  # for [WEATHER, SEARCH], schemas written out
    '{"name": "get_weather", "description": "Get the weather for a specific location", '
    '"parameters": {"type": "object", "properties": {"location": {"type": "string", '
    '"description": "The city name"}, "unit": {"type": "string", "enum": ["celsius", '
    '"fahrenheit"], "description": "Temperature unit"}}, "required": ["location"]}}\n'
    '{"name": "search", "description": "Search the web for information", "parameters": '
    '{"type": "object", "properties": {"query": {"type": "string", "description": '
    '"Search query"}, "num_results": {"type": "integer", "description": "Number of '
    'results to return"}}, "required": ["query"]}}'
) + TOOLS_TAIL
WEATHER_CALL = (
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
    '</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
)
THINK_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n"
)


def basic_conversation() -> list[dict]:
    """Official fixture 2."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "reasoning_content": "The user said hello, I should greet back.",
         "content": "Hi there! How can I help you?"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant",
         "reasoning_content": "The user asks about the capital of France. It is Paris.",
         "content": "The capital of France is Paris."},
    ]


def weather_conversation() -> list[dict]:
    """Official fixture 1 (tools passed separately)."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Beijing?"},
        {"role": "assistant", "content": None,
         "reasoning_content": "The user wants to know the weather in Beijing. "
                              "I should use the get_weather tool.",
         "tool_calls": [{"id": "call_001", "type": "function", "function": {
             "name": "get_weather", "arguments": '{"location": "Beijing", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_001",
         "content": '{"temperature": 22, "condition": "sunny", "humidity": 45}'},
        {"role": "assistant",
         "reasoning_content": "Got the weather data. Let me format a nice response.",
         "content": "The weather in Beijing is currently sunny with a temperature of 22°C and "
                    "45% humidity."},
    ]


# ---- the marker strings ------------------------------------------------------------------
def test_marker_strings_agree_with_the_tokenizer() -> None:
    pytest.importorskip("tokenizers")
    from dsv4.text import tokenizer

    assert set(chat.SPECIAL_STRINGS) == set(tokenizer.SPECIAL_TOKENS)
    for name in ("BOS", "EOS", "PAD", "USER", "ASSISTANT", "LATEST_REMINDER", "THINK_START",
                 "THINK_END", "DSML"):
        assert getattr(chat, name) == getattr(tokenizer, name), name
    assert chat.BOS == BOS and chat.EOS == EOS and "\uff5c" in chat.DSML


def test_prompts_tokenize_with_the_markers_as_single_tokens() -> None:
    pytest.importorskip("tokenizers")
    from dsv4.text.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    prompt = preview(weather_conversation(), thinking=True, tools=[WEATHER])
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    for marker in (BOS, EOS, U, A, "<think>", "</think>", "｜DSML｜"):
        assert tok.token_to_id(marker) in ids, marker


def test_chat_module_does_not_import_torch() -> None:
    code = "import sys, dsv4.text.chat; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- exact prompts -----------------------------------------------------------------------
def test_official_fixture_2_thinking_drops_earlier_reasoning() -> None:
    expected = (
        f"{BOS}You are a helpful assistant.{U}Hello{A}</think>Hi there! How can I help you?{EOS}"
        f"{U}What is the capital of France?{A}<think>The user asks about the capital of France. "
        f"It is Paris.</think>The capital of France is Paris.{EOS}"
    )
    assert preview(basic_conversation(), thinking=True) == expected


def test_non_think_multi_turn() -> None:
    expected = (
        f"{BOS}You are a helpful assistant.{U}Hello{A}</think>Hi there! How can I help you?{EOS}"
        f"{U}What is the capital of France?{A}</think>The capital of France is Paris.{EOS}"
    )
    # reasoning_content is never rendered in non-think mode
    assert preview(basic_conversation(), thinking=False) == expected


def test_official_fixture_1_thinking_with_tools_keeps_all_reasoning() -> None:
    expected = (
        f"{BOS}You are a helpful assistant.{TOOLS_SECTION}"
        f"{U}What's the weather in Beijing?{A}<think>The user wants to know the weather in "
        f"Beijing. I should use the get_weather tool.</think>{WEATHER_CALL}{EOS}"
        f'{U}<tool_result>{{"temperature": 22, "condition": "sunny", "humidity": 45}}'
        f"</tool_result>{A}<think>Got the weather data. Let me format a nice response.</think>"
        f"The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity."
        f"{EOS}"
    )
    assert preview(weather_conversation(), thinking=True, tools=[WEATHER, SEARCH]) == expected
    # The same tools given on the system message, as in the official fixture file.
    messages = weather_conversation()
    messages[0]["tools"] = [WEATHER, SEARCH]
    assert preview(messages, thinking=True) == expected


def test_tools_in_non_think_mode() -> None:
    expected = (
        f"{BOS}You are a helpful assistant.{TOOLS_SECTION}"
        f"{U}What's the weather in Beijing?{A}</think>{WEATHER_CALL}{EOS}"
        f'{U}<tool_result>{{"temperature": 22, "condition": "sunny", "humidity": 45}}'
        f"</tool_result>{A}</think>The weather in Beijing is currently sunny with a temperature "
        f"of 22°C and 45% humidity.{EOS}"
    )
    assert preview(weather_conversation(), tools=[WEATHER, SEARCH]) == expected


def test_generation_prompts_for_the_three_modes() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert preview(messages) == f"{BOS}{U}hi{A}</think>"
    assert preview(messages, thinking=True) == f"{BOS}{U}hi{A}<think>"
    assert preview(messages, thinking=True, reasoning_effort="high") == f"{BOS}{U}hi{A}<think>"
    assert preview(messages, thinking=True, reasoning_effort="max") == (
        f"{BOS}{THINK_MAX}{U}hi{A}<think>")
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert preview(with_system, thinking=True, reasoning_effort="max") == (
        f"{BOS}{THINK_MAX}Be brief.{U}hi{A}<think>")
    # Think-Max is a think-mode instruction: non-think ignores the effort, as the official does.
    assert preview(messages, reasoning_effort="max") == f"{BOS}{U}hi{A}</think>"
    assert preview(messages, thinking=True, add_generation_prompt=False) == f"{BOS}{U}hi"


def test_tool_results_merge_into_one_user_turn_in_call_order() -> None:
    calls = [{"id": i, "type": "function", "function": {"name": "search", "arguments": a}}
             for i, a in (("c1", '{"query": "x"}'), ("c2", '{"query": "y", "num_results": 3}'))]
    messages = [
        {"role": "user", "content": "Look up x and y."},
        {"role": "assistant", "content": "On it.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c2", "content": "Y"},  # answered out of order
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "X1"},
                                                           {"type": "text", "text": "X2"}]},
        {"role": "user", "content": "Thanks, summarize."},
    ]
    expected = (
        f"{BOS}{U}Look up x and y.{A}</think>On it.\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="search">\n'
        '<｜DSML｜parameter name="query" string="true">x</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="search">\n'
        '<｜DSML｜parameter name="query" string="true">y</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="num_results" string="false">3</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}"
        f"{U}<tool_result>X1\n\nX2</tool_result>\n\n<tool_result>Y</tool_result>\n\n"
        f"Thanks, summarize.{A}</think>"
    )
    assert preview(messages) == expected


def test_request_tools_without_a_system_message_get_an_empty_one() -> None:
    prompt = preview([{"role": "user", "content": "hi"}], tools=[WEATHER, SEARCH])
    assert prompt == f"{BOS}{TOOLS_SECTION}{U}hi{A}</think>"


def test_developer_messages_and_consecutive_user_messages() -> None:
    messages = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "user", "content": "Are you there?"},
    ]
    assert preview(messages) == (
        f"{BOS}{U}Answer in French.{U}Hello\n\nAre you there?{A}</think>")
    # In think mode with dropping, a developer message before the last user turn is dropped.
    old = [{"role": "developer", "content": "Old rule."}, {"role": "user", "content": "a"},
           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert preview(old, thinking=True) == f"{BOS}{U}a{A}</think>b{EOS}{U}c{A}<think>"
    assert preview(old, thinking=True, drop_thinking=False) == (
        f"{BOS}{U}Old rule.{U}a{A}<think></think>b{EOS}{U}c{A}<think>")


def test_reasoning_retention_rules() -> None:
    messages = basic_conversation()[:4]
    dropped = preview(messages, thinking=True)
    kept = preview(messages, thinking=True, drop_thinking=False)
    assert "The user said hello" not in dropped
    assert (f"{A}<think>The user said hello, I should greet back.</think>Hi there! How can I "
            f"help you?{EOS}") in kept
    assert dropped.endswith(f"{U}What is the capital of France?{A}<think>")
    # Any tools switch dropping off (interleaved thinking): reasoning survives a new user turn.
    with_tools = preview(messages, thinking=True, tools=[SEARCH])
    search_section = TOOLS_HEAD + json.dumps(SEARCH["function"]) + TOOLS_TAIL
    assert with_tools == kept.replace("You are a helpful assistant.",
                                      "You are a helpful assistant." + search_section)


def test_segments_mark_exactly_the_generated_text() -> None:
    messages = weather_conversation()
    segments = preview_segments(messages, thinking=True, tools=[WEATHER])
    assert "".join(text for text, _ in segments) == preview(messages, thinking=True,
                                                                tools=[WEATHER])
    generated = [text for text, is_generated in segments if is_generated]
    assert generated == [
        "The user wants to know the weather in Beijing. I should use the get_weather tool."
        f"</think>{WEATHER_CALL}{EOS}",
        "Got the weather data. Let me format a nice response.</think>The weather in Beijing is "
        f"currently sunny with a temperature of 22°C and 45% humidity.{EOS}",
    ]
    # Every prompt segment before a generated one ends by opening the assistant turn.
    for (text, is_generated), (_, next_generated) in zip(segments, segments[1:]):
        if next_generated:
            assert not is_generated and text.endswith(f"{A}<think>")


def test_user_text_is_not_escaped() -> None:
    # Markup typed by a user is the user's text: the encoder passes it through untouched.
    tricky = "Why does </think> or <｜DSML｜tool_calls> or <｜end▁of▁sentence｜> break things?"
    assert preview([{"role": "user", "content": tricky}]) == f"{BOS}{U}{tricky}{A}</think>"


# ---- bad messages ------------------------------------------------------------------------
def _call(call_id: str = "c1", arguments: object = "{}") -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "search", "arguments": arguments}}


@pytest.mark.parametrize("messages, match", [
    ([], r"messages: expected a non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
     r"messages\[1\]\.role: unknown role 'bot'"),
    (["hello"], r"messages\[0\]: expected an object"),
    ([{"role": "user"}], r"messages\[0\]\.content: missing"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content: expected a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\]: only text parts"),
    ([{"role": "developer", "content": ""}], r"messages\[0\]\.content: a developer message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}],
     r"messages\[1\]\.content: missing"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
     r"messages\[1\]: an assistant message must follow a user, developer or tool message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], r"messages\[2\]: an assistant message must follow"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}],
     r"messages\[1\]\.tool_call_id: 'c1' matches no tool call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls":
      [_call()]}, {"role": "tool", "content": "r"}], r"messages\[2\]\.tool_call_id: missing"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls":
      [_call()]}, {"role": "tool", "tool_call_id": "c9", "content": "r"}],
     r"messages\[2\]\.tool_call_id: 'c9' matches no tool call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls":
      [_call()]}, {"role": "tool", "tool_call_id": "c1", "content": "r"},
      {"role": "tool", "tool_call_id": "c1", "content": "r"}],
     r"messages\[3\]\.tool_call_id: 'c1' already has a result"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls":
      [_call()]}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
      {"role": "tool", "tool_call_id": "c1", "content": "late"}],
     r"messages\[4\]\.tool_call_id: 'c1' matches no tool call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
      "tool_calls": [_call(arguments="{not json")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
      "tool_calls": [_call(arguments="[1, 2]")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: expected a JSON object"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
      "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.name: missing"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
      "tool_calls": [_call("x"), _call("x")]}], r"messages\[1\]\.tool_calls: duplicate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
      "reasoning_content": 7}], r"messages\[1\]\.reasoning_content: expected a string"),
    ([{"role": "system", "content": "s", "tools": [{"name": "f"}]}],
     r"messages\[0\]\.tools\[0\]\.function: missing"),
])
def test_bad_messages_name_the_index_and_field(messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preview(messages)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"reasoning_effort: 'extreme'"):
        preview([{"role": "user", "content": "a"}], thinking=True, reasoning_effort="extreme")
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.name"):
        preview([{"role": "user", "content": "a"}], tools=[{"type": "function",
                                                                "function": {"name": ""}}])
    with pytest.raises(ValueError, match=r"tools: given both"):
        preview([{"role": "system", "content": "s", "tools": [SEARCH]}], tools=[SEARCH])


# ---- parsing -----------------------------------------------------------------------------
def test_parse_the_official_fixture_turns() -> None:
    prompt = preview(weather_conversation(), thinking=True, tools=[WEATHER, SEARCH])
    marker = f"{A}<think>"
    first = prompt[prompt.find(marker) + len(marker):prompt.find(U, prompt.find(marker))]
    parsed = parse_completion(first, thinking=True, strict=True)
    assert parsed["reasoning_content"] == ("The user wants to know the weather in Beijing. "
                                           "I should use the get_weather tool.")
    assert parsed["content"] == ""
    assert parsed["tool_calls"] == [{"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location": "Beijing", "unit": "celsius"}'}}]
    last = parse_completion(prompt[prompt.rfind(marker) + len(marker):], thinking=True,
                            strict=True)
    assert last["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in last["content"] and last["tool_calls"] == []


def test_parse_non_think_and_missing_eos() -> None:
    assert parse_completion("Paris.", thinking=False) == {
        "role": "assistant", "content": "Paris.", "reasoning_content": None, "tool_calls": [],
        "problems": []}
    assert parse_completion(f"hm</think>Paris.{EOS}", thinking=True)["content"] == "Paris."
    ids = parse_completion(f"{WEATHER_CALL}{EOS}", thinking=False, call_id_prefix="call_r7_")
    assert ids["tool_calls"][0]["id"] == "call_r7_0"


ROUND_TRIP_ASSISTANTS = [
    {"content": "The capital of France is Paris.", "reasoning_content": "Easy one."},
    {"content": "", "reasoning_content": ""},  # empty turn
    {"content": "Ünïcødé ✓ 日本語 🎉 and a fullwidth bar ｜ and ▁", "reasoning_content": "思考 🤔"},
    {"content": "a < b > c, <b>bold</b>, </thin, <｜not a token, \n\nlast\n\n",
     "reasoning_content": "x <think y </thin z\n\n<"},
    {"content": "Calling two tools.", "reasoning_content": "Plan: search, then weather.",
     "tool_calls": [
         _call("c1", json.dumps({"query": "line1\nline2 <tag> \"quoted\" 日本", "num_results": 5,
                                 "safe": True, "ratio": 0.25, "tags": ["a", "b"],
                                 "filters": {"lang": "en", "n": None}, "empty": "",
                                 "looks_like_json": "true", "number_string": "42"})),
         {"id": "c2", "type": "function", "function": {
             "name": "get_weather", "arguments": {"location": "Zürich", "unit": "celsius"}}},
     ]},
    {"content": None, "reasoning_content": "Just call it.",
     "tool_calls": [_call("c1", "{}")]},  # no content, no arguments
    {"content": "ends with blank lines\n\n", "reasoning_content": "r",
     "tool_calls": [_call("c1", '{"query": "q"}')]},
]


def _normalized(message: dict, thinking: bool) -> dict:
    calls = [(c["function"]["name"], c["function"]["arguments"] if isinstance(
        c["function"]["arguments"], dict) else json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or []]
    return {"content": message.get("content") or "",
            "reasoning_content": (message.get("reasoning_content") or "") if thinking else None,
            "calls": calls}


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("index", range(len(ROUND_TRIP_ASSISTANTS)))
def test_round_trip_encode_then_parse(index: int, thinking: bool) -> None:
    assistant = {"role": "assistant", **ROUND_TRIP_ASSISTANTS[index]}
    messages = [
        {"role": "system", "content": "sys"},
        # A user turn full of markup: it must not disturb anything.
        {"role": "user", "content": "</think> <｜DSML｜tool_calls> <｜end▁of▁sentence｜> 日本"},
        {"role": "assistant", "content": "earlier", "reasoning_content": "earlier thought"},
        {"role": "user", "content": ""},  # empty user turn
        assistant,
    ]
    segments = encode_chat_segments(messages, thinking=thinking, tools=[WEATHER, SEARCH],
                                    add_generation_prompt=False)
    completion = [text for text, generated in segments if generated][-1]
    parsed = parse_completion(completion, thinking=thinking, strict=True)
    assert _normalized(parsed, thinking) == _normalized(assistant, thinking)
    # Arguments come back as JSON strings, ids numbered in order.
    assert [c["id"] for c in parsed["tool_calls"]] == [
        f"call_{k}" for k in range(len(assistant.get("tool_calls") or []))]
    # Parsing is the exact inverse: re-encoding the parsed message gives the same completion.
    again = encode_chat_segments([*messages[:-1], parsed], thinking=thinking,
                                 tools=[WEATHER, SEARCH], add_generation_prompt=False)
    assert [t for t, g in again if g][-1] == completion


def test_string_params_stay_strings_and_others_are_decoded() -> None:
    completion = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">42</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="o" string="false">{"k":[1,2.5,null]}</｜DSML｜parameter>\n'
        f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{EOS}"
    )
    call = parse_completion(completion, thinking=False, strict=True)["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"s": "42", "n": 42,
                                                         "o": {"k": [1, 2.5, None]}}


# ---- streaming ---------------------------------------------------------------------------
def _stream(text: str, cuts: list[int], thinking: bool) -> tuple[dict, list[dict], list[str]]:
    parser = StreamParser(thinking=thinking)
    events: list[dict] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        events += parser.feed(text[start:end])
    events += parser.finish()
    message = chat.collect_events(events, thinking=thinking, problems=parser.problems)
    return message, events, parser.problems


def _completions() -> list[tuple[str, bool]]:
    cases = []
    for thinking in (True, False):
        for assistant in ROUND_TRIP_ASSISTANTS:
            messages = [{"role": "user", "content": "q"}, {"role": "assistant", **assistant}]
            segments = encode_chat_segments(messages, thinking=thinking, tools=[SEARCH],
                                            add_generation_prompt=False)
            completion = segments[-1][0]
            cases.append((completion, thinking))
            cases.append((completion.removesuffix(EOS), thinking))  # server stripped EOS
    return cases + MALFORMED


MALFORMED = [
    # truncated mid-reasoning, mid-content, mid-tool-call
    ("still thinking about </thi", True),
    ("r</think>partial answer <｜DSML｜tool_cal", True),
    ('ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="search">\n<｜DSML｜parameter name="q'
     '" string="true">abc', False),
    # stray special tokens and junk
    (f"a<think>b</think>c</think>d<｜User｜>e{BOS}f｜DSML｜g{EOS}after the end", True),
    (f'x<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">not json'
     f'</｜DSML｜parameter>\n<｜DSML｜parameter name="b">[1]</｜DSML｜parameter>\n'
     f'<｜DSML｜parameter name="b">"s"</｜DSML｜parameter>\njunk</｜DSML｜invoke>'
     f'</｜DSML｜tool_calls>\ntrailing text{EOS}', False),
    ('<｜DSML｜tool_calls><｜DSML｜invoke name="a"><｜DSML｜invoke name="b"></｜DSML｜invoke>'
     '</｜DSML｜parameter></｜DSML｜invoke><｜DSML｜bogus x="1"><｜DSML｜tool_calls>'
     '</｜DSML｜tool_calls>', False),
    (f'<｜DSML｜tool_calls><｜DSML｜invoke name="cut">{EOS}', False),
    ("reasoning that calls a tool directly\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke "
     'name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', True),
    ("</｜DSML｜tool_calls> then text", False),
    ("think </｜DSML｜invoke> more</think>a <｜DSML｜parameter name=\"x\" string=\"true\">v"
     "</｜DSML｜parameter> b", True),
    ("", True),
    ("", False),
    # overlong tags, in and outside a block
    ('<｜DSML｜tool_calls><｜DSML｜invoke name="' + "n" * 1100 + '"></｜DSML｜invoke>'
     '<｜DSML｜invoke name="ok"></｜DSML｜invoke></｜DSML｜tool_calls>', False),
    ('a <｜DSML｜invoke name="' + "n" * 1100 + " rest", True),
]


@pytest.mark.parametrize("case", range(len(_completions())))
def test_stream_equals_parse_under_any_chunking(case: int) -> None:
    text, thinking = _completions()[case]
    whole = parse_completion(text, thinking=thinking)
    _, _, whole_problems = _stream(text, [], thinking)
    rng = random.Random(case)
    chunkings = [list(range(1, len(text)))]  # one character at a time
    for _ in range(20):
        chunkings.append(sorted(rng.sample(range(1, len(text)), min(len(text) - 1,
                                                                    rng.randint(0, 8))))
                         if len(text) > 1 else [])
    for cuts in chunkings:
        result, events, problems = _stream(text, cuts, thinking)
        assert result == whole, cuts
        assert problems == whole_problems, cuts
        # The deltas add up to the one-shot result under every chunking, and for well-formed
        # completions that result is exactly the encoded message (round-trip test), so no
        # partial marker can have slipped into a delta; check the obvious ones anyway.
        for event in events:
            delta = event.get("content", event.get("reasoning_content", ""))
            assert not any(s in delta for s in chat.SPECIAL_STRINGS), (event, cuts)
            if (text, thinking) not in MALFORMED:
                assert "DSML" not in delta and "think>" not in delta, (event, cuts)


@pytest.mark.parametrize("case", range(len(ROUND_TRIP_ASSISTANTS) * 2))
def test_stream_emits_each_event_as_soon_as_it_is_certain(case: int) -> None:
    text, thinking = _completions()[2 * case]  # the well-formed ones, with EOS
    assert text.endswith(EOS)
    parser = StreamParser(thinking=thinking)
    for end in range(1, len(text) + 1):
        for event in parser.feed(text[end - 1]):
            if "tool_call" in event:  # complete the moment its invoke closes
                assert text[:end].endswith("</｜DSML｜invoke>"), text[:end]
    assert parser.finish() == []  # nothing was left waiting for the end
    assert parser.finished and parser.problems == []


def test_markup_is_held_back_until_resolved() -> None:
    parser = StreamParser(thinking=True)
    assert parser.feed("Let me think") == [{"reasoning_content": "Let me think"}]
    assert parser.feed(" <") == [{"reasoning_content": " "}]  # "<" may open </think>
    assert parser.feed("/thi") == []
    assert parser.feed("nk>Answer") == [{"content": "Answer"}]
    assert parser.feed(":\n") == [{"content": ":"}]  # "\n" may open "\n\n<｜DSML｜"
    assert parser.feed("\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n") == []
    assert parser.feed('<｜DSML｜parameter name="query" string="true">cats</｜DSML｜param') == []
    assert parser.feed("eter>\n</｜DSML｜invoke>") == [{"tool_call": {
        "id": "call_0", "type": "function",
        "function": {"name": "search", "arguments": '{"query": "cats"}'}}}]
    assert parser.feed(f"\n</｜DSML｜tool_calls>{EOS}") == []
    assert parser.finish() == [] and parser.finished and parser.problems == []


def test_malformed_output_is_repaired_and_reported() -> None:
    truncated = parse_completion("still thinking", thinking=True)
    assert truncated["reasoning_content"] == "still thinking" and truncated["content"] == ""
    with pytest.raises(ValueError, match="never closed with </think>"):
        parse_completion("still thinking", thinking=True, strict=True)

    stray = parse_completion(f"a<think>b</think>c</think>d{EOS}ignored", thinking=True)
    assert stray["reasoning_content"] == "ab" and stray["content"] == "cd"

    cut_tag = parse_completion(MALFORMED[1][0], thinking=True)
    assert cut_tag["content"] == "partial answer " and cut_tag["tool_calls"] == []

    # A call whose closing tags never came: read to the end, unless the text was cut off by a
    # length limit (then it may be half written: reported, never returned).
    ended = parse_completion(MALFORMED[2][0], thinking=False)
    assert ended["content"] == "ok" and json.loads(
        ended["tool_calls"][0]["function"]["arguments"]) == {"q": "abc"}
    assert any("was not closed" in problem for problem in ended["problems"])
    cut = parse_completion(MALFORMED[2][0], thinking=False, cut_off=True)
    assert cut["content"] == "ok" and cut["tool_calls"] == []
    assert "the invoke of 'search' was cut off by the length limit" in cut["problems"][0]

    repaired = parse_completion(MALFORMED[4][0], thinking=False)
    assert repaired["content"] == "xtrailing text"
    assert json.loads(repaired["tool_calls"][0]["function"]["arguments"]) == {
        "a": "not json", "b": "s"}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_completion(MALFORMED[4][0], thinking=False, strict=True)

    nested = parse_completion(MALFORMED[5][0], thinking=False)
    assert [c["function"]["name"] for c in nested["tool_calls"]] == ["a", "b"]

    in_reasoning = parse_completion(MALFORMED[7][0], thinking=True)
    assert in_reasoning["reasoning_content"] == "reasoning that calls a tool directly"
    assert [c["function"]["name"] for c in in_reasoning["tool_calls"]] == ["f"]
    with pytest.raises(ValueError, match="tool calls began inside the reasoning"):
        parse_completion(MALFORMED[7][0], thinking=True, strict=True)

    # A stray DSML tag outside a block is dropped and the text it interrupted goes on.
    stray_tags = parse_completion(MALFORMED[9][0], thinking=True)
    assert stray_tags["reasoning_content"] == "think  more"
    assert stray_tags["content"] == "a  b" and stray_tags["tool_calls"] == []

    overlong = parse_completion(MALFORMED[-2][0], thinking=False)
    assert [c["function"]["name"] for c in overlong["tool_calls"]] == ["ok"]


def test_parser_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="delta: expected str"):
        StreamParser(thinking=False).feed(None)  # type: ignore[arg-type]


# ---- malformed tool calls: fail closed -----------------------------------------------------
D = "｜DSML｜"
PARAM_Q = f'<{D}parameter name="q" string="true">'
MALFORMED_CALLS = {
    # name: (completion, thinking, names of the calls that must come back, their arguments)
    "missing </parameter> before the next invoke": (
        f'<{D}tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x\n</{D}invoke>\n<{D}invoke name="g">'
        f'\n{PARAM_Q}y</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>{EOS}', False,
        [("f", {"q": "x"}), ("g", {"q": "y"})]),
    "missing </parameter> before the next parameter": (
        f'<{D}tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x\n'
        f'<{D}parameter name="n" string="false">3</{D}parameter>\n</{D}invoke>\n'
        f'</{D}tool_calls>', False, [("f", {"q": "x", "n": 3})]),
    "missing </invoke> before </tool_calls>": (
        f'<{D}tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x</{D}parameter>\n</{D}tool_calls>'
        f'{EOS}', False, [("f", {"q": "x"})]),
    "missing every closing tag before EOS": (
        f'<{D}tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x{EOS}', False, [("f", {"q": "x"})]),
    "ASCII bars": (
        '<|DSML|tool_calls>\n<|DSML|invoke name="f">\n<|DSML|parameter name="q" string="true">'
        'x</|DSML|parameter>\n</|DSML|invoke>\n</|DSML|tool_calls>', False, [("f", {"q": "x"})]),
    "ASCII and fullwidth bars mixed": (
        f'\n\n<|DSML|tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x</|DSML|parameter>\n'
        f'</{D}invoke>\n</|DSML|tool_calls>', False, [("f", {"q": "x"})]),
    "extra spaces in tags": (
        f'<{D}tool_calls >\n<{D}invoke  name = "f" >\n<{D}parameter name="q"  string="true" >'
        f'x</{D}parameter >\n< /{D}invoke>\n</ {D}tool_calls>', False, [("f", {"q": "x"})]),
    "a tool call opened before </think>": (
        f'I will call f.\n\n<{D}tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x</{D}parameter>\n'
        f'</{D}invoke>\n</{D}tool_calls>', True, [("f", {"q": "x"})]),
    "an ASCII tool call inside the reasoning": (
        f'plan <|DSML|invoke name="f">\n{PARAM_Q}x</{D}parameter>\n</|DSML|invoke></think>ok',
        True, [("f", {"q": "x"})]),
    "a non-JSON value for string=false": (
        f'<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="n" string="false">'
        f'{{bad</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>', False, [("f", {"n": "{bad"})]),
    "an invoke without a name": (
        f'<{D}tool_calls>\n<{D}invoke>\n{PARAM_Q}x</{D}parameter>\n</{D}invoke>\n'
        f'<{D}invoke name="g">\n</{D}invoke>\n</{D}tool_calls>', False, [("g", {})]),
    "an unknown tag and loose text in the block": (
        f'<{D}tool_calls>\nsure!\n<{D}call name="f">\n<{D}invoke name="g">\n</{D}invoke>\n'
        f'</{D}tool_calls>', False, [("g", {})]),
    "content, then calls with missing closes, then EOS": (
        f'Checking.\n\n<{D}tool_calls>\n<{D}invoke name="f">\n{PARAM_Q}x\n<{D}invoke name="g">\n'
        f'<{D}parameter name="o" string="false">{{"k": [1, {{"d": null}}]}}{EOS}', False,
        [("f", {"q": "x"}), ("g", {"o": {"k": [1, {"d": None}]}})]),
}
_INVOKE_OPENER = re.compile(r"<\s*[｜|]DSML[｜|]\s*invoke\b")


def _strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings_in(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings_in(item)]
    return []


def _assert_fails_closed(text: str, message: dict, unparsed: str) -> None:
    texts = [message["content"], message["reasoning_content"] or ""]
    for call in message["tool_calls"]:
        arguments = json.loads(call["function"]["arguments"])  # always valid JSON
        assert isinstance(arguments, dict)
        texts += _strings_in(arguments)
    for piece in texts:
        assert "DSML" not in piece and not any(s in piece for s in chat.SPECIAL_STRINGS), piece
    openers = len(_INVOKE_OPENER.findall(text))
    returned = len(message["tool_calls"])
    assert returned + len(_INVOKE_OPENER.findall(unparsed)) >= openers
    if returned < openers:
        assert message["problems"]


@pytest.mark.parametrize("name", list(MALFORMED_CALLS))
def test_malformed_tool_calls_are_recovered_and_reported(name: str) -> None:
    text, thinking, expected = MALFORMED_CALLS[name]
    message, events, problems = _stream(text, [], thinking)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in message["tool_calls"]]
    assert calls == expected
    assert problems and message["problems"] == problems
    unparsed = "".join(e.get("unparsed", "") for e in events)
    _assert_fails_closed(text, message, unparsed)
    assert parse_completion(text, thinking=thinking) == message
    rng = random.Random(name)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
        again, again_events, _ = _stream(text, cuts, thinking)
        assert again == message, cuts
        assert "".join(e.get("unparsed", "") for e in again_events) == unparsed, cuts


def test_the_invoke_without_a_name_is_returned_as_unparsed_text() -> None:
    text = MALFORMED_CALLS["an invoke without a name"][0]
    _, events, problems = _stream(text, [], False)
    unparsed = "".join(e.get("unparsed", "") for e in events)
    assert unparsed == f'<{D}invoke>\n{PARAM_Q}x</{D}parameter>\n</{D}invoke>'
    assert "an invoke with the invalid tool name '' was not parsed" in problems


@pytest.mark.parametrize("case", range(len(_completions())))
def test_every_completion_fails_closed(case: int) -> None:
    text, thinking = _completions()[case]
    for cut_off in (False, True):
        parser = StreamParser(thinking=thinking)
        events = parser.feed(text) + parser.finish(cut_off=cut_off)
        message = chat.collect_events(events, thinking=thinking, problems=parser.problems)
        _assert_fails_closed(text, message, "".join(e.get("unparsed", "") for e in events))
