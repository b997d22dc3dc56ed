"""The DeepSeek-V4 chat encodings (official `encoding_dsv4.py`) and the parser back from text.

V4 ships no Jinja template. Two encodings, chosen by name (`ENCODINGS`):

- "v4" (the default): DeepSeek's current official V4 encoding, byte for byte what DeepSeek's
  `deepseek-recipe` package renders (tests compare prompts, special-token positions and token
  ids with the real tokenizer). Think mode adds a reasoning-effort instruction after BOS
  (`_effort_prefix`); system and developer messages are one system text, first; tool schemas
  are normalised to name/description/parameters; tool calls whose arguments are not a JSON
  object are written as one `arguments` parameter; `latest_reminder` messages and OpenAI's
  `response_format` have their official sections.
- "v4-preview": the April preview encoder (`encoding_dsv4.py`), as dsv4 rendered it before.

    BOS [effort instruction] system text ["\n\n## Tools ..."]
    <｜User｜>user text<｜Assistant｜><think>reasoning</think>answer
    \n\n<｜DSML｜tool_calls> ... </｜DSML｜tool_calls><｜end▁of▁sentence｜>
    <｜User｜><tool_result>...</tool_result><｜Assistant｜><think>

A prompt is laid out as `Piece`s: markup (exactly one special token each) and plain text.
`encode_chat` joins them into a string; `encode_chat_ids` tokenizes markup as its id and all
other text with the tokenizer's `encode_plain`, so text in a message that spells `<｜User｜>`,
`</think>` or EOS stays text: no control-token injection. Every prompt of the project (server,
chat CLI, eval, SFT, post-training) is built that way.

`parse_completion` and `StreamParser` read what the model generated after such a prompt back into
an OpenAI assistant message: `reasoning_content`, `content`, `tool_calls` and `problems`. Both
are the same state machine, so a stream cut at any point yields exactly the non-streaming
result, and text that could still turn into markup is held back until it is resolved, so no
marker ever leaks. The parser fails closed (see `StreamParser`): malformed tool calls are
repaired or reported, never silently dropped, and never leave markup in the message.

Where this differs from the official encoder, it is stricter: bad input that the official code
would render into a malformed prompt (an unknown role, a tool result matching no call, an
assistant turn not following a user turn, a conversation ending with a complete assistant
message) raises ValueError naming the message index and field. OpenAI content parts are joined
with blank lines, as the official encoder joins content blocks. Not supported: quick-instruction
`task` tokens, images. Tool argument names containing `"` or `>`, and text containing the
markers themselves inside assistant content, reasoning or string arguments, cannot round-trip
through the parser (the official format has no escaping).

This module is pure string handling: no torch, no tokenizer import. The marker strings below
must match `dsv4.text.tokenizer.SPECIAL_TOKENS` (a test checks it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TASK_TOKENS = (
    "<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>",
    "<｜read_url｜>", "<｜extracted_url｜>",
)
SPECIAL_STRINGS = (
    BOS, EOS, PAD, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML, *TASK_TOKENS,
)

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_CLOSE = f"</{DSML}parameter>"

# The V4 report's reasoning-effort table, laid out as the official encoder does: one sentence
# per line and a blank line before the first message.
THINK_MAX_INSTRUCTION = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

# The "## Tools" section appended to the system message (the model was trained on this text).
TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by \
writing a "{TOOL_CALLS_OPEN}" block like the following:

{TOOL_CALLS_OPEN}
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
<{DSML}invoke name="$TOOL_NAME2">
...
{INVOKE_CLOSE}
{TOOL_CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types \
(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete \
reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""



# ---- encoding ----------------------------------------------------------------------------
ENCODINGS = ("v4", "v4-preview")
# OpenAI's names plus DeepSeek's xhigh/max. "none" means no thinking; how the others map to a
# prompt depends on the encoding (`_effort_prefix`).
REASONING_EFFORTS = (None, "none", "minimal", "low", "medium", "high", "xhigh", "max")
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
# The official V4 encoder refuses other tool names (they could not be written in a DSML tag).
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]+")

# The official V4 encoding's reasoning-effort instructions, put right after BOS in think mode.
# These strings are prompt text the model was trained on, taken from DeepSeek's published
# encoder output (`deepseek-recipe`); tests compare them byte for byte.
EFFORT_ABSOLUTE_MAXIMUM = THINK_MAX_INSTRUCTION
EFFORT_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every "
    "causal chain to its root, and resolve the underlying cause rather than any surface "
    "symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n"
)
JSON_OBJECT_SECTION = ("\n\nYou are a helpful assistant designed to output JSON.\n"
                       "## Response Format:\n\nReply with JSON object ONLY.")
JSON_SCHEMA_SECTION = ("\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
                       "schema to reply:\n")


class Piece(NamedTuple):
    """A run of prompt text. `markup` pieces are exactly one special token (BOS, `<｜User｜>`,
    `｜DSML｜`, ...); all other text, above all anything taken from a message, is plain text that
    must be tokenized without the special-token vocabulary. `generated` marks what the model
    produces itself in an assistant turn (the SFT loss goes there)."""

    text: str
    markup: bool
    generated: bool


_MARKUP_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in
                                          sorted(SPECIAL_STRINGS, key=len, reverse=True)) + ")")


class _PromptBuilder:
    """Collects pieces; `template` is the encoder's own text, whose special strings are markup,
    `text` is message text, which never is."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.generated = False

    def markup(self, token: str) -> None:
        self.pieces.append(Piece(token, True, self.generated))

    def text(self, text: str) -> None:
        if text:
            self.pieces.append(Piece(text, False, self.generated))

    def template(self, text: str) -> None:
        for k, part in enumerate(_MARKUP_SPLIT.split(text)):
            if k % 2:
                self.markup(part)
            else:
                self.text(part)


@dataclass
class _Turn:
    """One rendered turn: tool results are already merged into a user turn as blocks."""

    role: str  # system | developer | user | assistant | latest_reminder
    text: str = ""  # system / developer / latest_reminder / assistant content
    tools: list[dict] | None = None  # system / developer: the `function` objects to list
    blocks: list[str] = field(default_factory=list)  # user: text and tool results
    is_result: list[bool] = field(default_factory=list)  # user: which blocks are tool results
    result_order: list[int] = field(default_factory=list)  # user: call index per block, -1=text
    reasoning: str = ""  # assistant
    calls: list[tuple[str, dict | str]] = field(default_factory=list)  # (name, arguments)
    prefix: bool = False  # assistant: the last message, to be continued by the model
    response_format: str = ""  # system: the response-format section, after the tools


def _to_json(value: Any, where: str, encoding: str = "v4") -> str:
    """JSON as the official encoder writes it: ", " and ": " separators, non-ASCII kept, keys in
    their given order, and (V4) floats in shortest form with the official exponent style
    (1.5e-7 and 0.00001, where Python, and so the preview encoder, writes 1.5e-07 and 1e-05)."""
    try:
        if encoding != "v4":
            return json.dumps(value, ensure_ascii=False)
        return _json_text(value)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"{where}: not JSON-serializable ({err})") from None


def _json_text(value: Any) -> str:
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, int) and not isinstance(value, bool) and not (
            -2**63 <= value < 2**64):
        return _float_text(float(value))  # beyond 64 bits the official reads a float
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"keys must be strings, got {key!r}")
            items.append(json.dumps(key, ensure_ascii=False) + ": " + _json_text(item))
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json_text(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _float_text(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{value} is not a JSON number")
    text = repr(value)  # shortest round-trip digits, as Rust's float formatting
    mantissa, e, exponent = text.partition("e")
    if not e:
        return text
    power = int(exponent)
    if power == -5:  # Rust switches to an exponent below 1e-5, Python below 1e-4
        sign, digits = ("-", mantissa[1:]) if mantissa.startswith("-") else ("", mantissa)
        return f"{sign}0.0000{digits.replace('.', '')}"
    return f"{mantissa}e{'+' if power > 0 else ''}{power}"


def _text_of(content: Any, where: str) -> str:
    """A string, or OpenAI content parts [{"type": "text", "text": ...}] joined by blank lines
    (the official encoder joins content blocks that way)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}[{j}]: only text parts are supported, got {part!r:.80}")
            parts.append(part["text"])
        return "\n\n".join(parts)
    if content is None:
        raise ValueError(f"{where}: missing")
    raise ValueError(f"{where}: expected a string or a list of text parts, "
                     f"got {type(content).__name__}")


def _tool_functions(tools: Any, where: str, encoding: str) -> list[dict]:
    """OpenAI tools [{"type": "function", "function": {...}}] -> the `function` objects, in
    V4 as the official encoder lists them: name, description ("" if none), parameters ({} if
    none), nothing else (`strict` and other keys are not shown to the model)."""
    if not isinstance(tools, list):
        raise ValueError(f"{where}: expected a list of tools, got {type(tools).__name__}")
    functions = []
    for j, tool in enumerate(tools):
        function = _named_function(tool, f"{where}[{j}]")
        if encoding == "v4":
            _check_tool_name(function["name"], f"{where}[{j}].function.name")
            description = function.get("description")
            if description is not None and not isinstance(description, str):
                raise ValueError(f"{where}[{j}].function.description: expected a string, "
                                 f"got {type(description).__name__}")
            function = {"name": function["name"], "description": description or "",
                        "parameters": function.get("parameters") or {}}
        _to_json(function, f"{where}[{j}].function")
        functions.append(function)
    return functions


def _check_tool_name(name: str, where: str) -> None:
    if not _TOOL_NAME.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a valid tool name (letters, digits, '_' "
                         "and '-' only)")


def _named_function(item: Any, here: str) -> dict:
    """The `function` object of a tool or tool call ({"type": "function", "function": {...}})
    with a non-empty name."""
    if not isinstance(item, dict) or item.get("type", "function") != "function":
        raise ValueError(f"{here}: expected {{'type': 'function', 'function': {{...}}}}, "
                         f"got {item!r:.80}")
    function = item.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{here}.function: missing or not an object")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{here}.function.name: missing or not a non-empty string")
    return function


def _call_arguments(arguments: Any, here: str, encoding: str) -> dict | str:
    """A tool call's arguments: a dict, or (V4) the raw string when it is not a JSON object,
    which the official encoder writes as one `arguments` parameter (clients send "" for tools
    without parameters)."""
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except json.JSONDecodeError as err:
            if encoding == "v4":
                return arguments
            raise ValueError(f"{here}: not valid JSON ({err})") from None
        if not isinstance(decoded, dict) and encoding == "v4":
            return arguments
        arguments = decoded
    if not isinstance(arguments, dict):
        raise ValueError(f"{here}: expected a JSON object, got {type(arguments).__name__}")
    for key, value in arguments.items():
        if not isinstance(value, str):
            _to_json(value, f"{here}[{key!r}]")
    return arguments


def _tool_calls(calls: Any, where: str, encoding: str
                ) -> tuple[list[tuple[str, dict | str]], list[str | None]]:
    """OpenAI tool_calls -> [(name, arguments)] and their ids (None where absent)."""
    if not isinstance(calls, list):
        raise ValueError(f"{where}: expected a list, got {type(calls).__name__}")
    parsed, ids = [], []
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        function = _named_function(call, here)
        arguments = _call_arguments(function.get("arguments", "{}"), f"{here}.function.arguments",
                                    encoding)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ValueError(f"{here}.id: expected a string, got {type(call_id).__name__}")
        parsed.append((function["name"], arguments))
        ids.append(call_id)
    present = [i for i in ids if i is not None]
    if len(set(present)) != len(present):
        raise ValueError(f"{where}: duplicate tool call ids {present}")
    return parsed, ids


def _normalize(messages: Any, encoding: str) -> list[_Turn]:
    """Validate OpenAI messages and merge tool results into user turns (V4 has no tool role).

    V4 (the official encoder's behaviour): system and developer messages are one system text,
    joined by blank lines and moved to the start. The preview keeps them where they are.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of messages")
    turns: list[_Turn] = []
    system = _Turn("system")
    open_calls: dict[str, int] = {}  # id -> call index, for the latest assistant's calls
    answered: set[str] = set()
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: expected an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: unknown role {role!r} (expected one of "
                             f"{', '.join(ROLES)})")
        if msg.get("prefix") and not (role == "assistant" and i == len(messages) - 1):
            raise ValueError(f"{where}.prefix: only the last message, an assistant message, "
                             "can be continued")
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ValueError(f"{where}.tool_call_id: missing or not a string")
            if call_id not in open_calls:
                raise ValueError(f"{where}.tool_call_id: {call_id!r} matches no tool call of the "
                                 f"preceding assistant message (open calls: {list(open_calls)})")
            if call_id in answered:
                raise ValueError(f"{where}.tool_call_id: {call_id!r} already has a result")
            answered.add(call_id)
            result = _text_of(msg.get("content"), f"{where}.content")
            _append_to_user_turn(turns, result, open_calls[call_id])
        elif role == "user":
            _append_to_user_turn(turns, _text_of(msg.get("content"), f"{where}.content"), -1)
        elif role == "assistant":
            turn, ids = _assistant_turn(msg, where, turns, encoding)
            turns.append(turn)
            open_calls = {call_id: j for j, call_id in enumerate(ids) if call_id is not None}
            answered = set()
        elif role == "latest_reminder":
            if encoding != "v4":
                raise ValueError(f"{where}.role: 'latest_reminder' is not part of the "
                                 f"{encoding} encoding (use encoding='v4')")
            turns.append(_Turn(role, text=_text_of(msg.get("content"), f"{where}.content")))
        else:  # system, developer
            turn = _system_turn(msg, role, where, encoding)
            if encoding == "v4":
                _merge_system(system, turn, where)
            else:
                turns.append(turn)
    if encoding == "v4" and (system.text or system.tools):
        turns.insert(0, system)
    for turn in turns:
        _order_tool_results(turn)
    return turns


def _system_turn(msg: dict, role: str, where: str, encoding: str) -> _Turn:
    text = _text_of(msg.get("content"), f"{where}.content")
    if role == "developer" and not text and encoding != "v4":
        raise ValueError(f"{where}.content: a developer message needs non-empty content")
    tools = msg.get("tools")
    functions = _tool_functions(tools, f"{where}.tools", encoding) if tools else None
    return _Turn(role, text=text, tools=functions)


def _merge_system(system: _Turn, turn: _Turn, where: str) -> None:
    # Empty system messages add nothing (not even a blank line), as in the official encoder.
    if turn.text:
        system.text = f"{system.text}\n\n{turn.text}" if system.text else turn.text
    if turn.tools:
        if system.tools:
            raise ValueError(f"{where}.tools: tools are already given in an earlier system "
                             "message")
        system.tools = turn.tools


def _append_to_user_turn(turns: list[_Turn], block: str, call_index: int) -> None:
    # Consecutive user and tool messages form one user turn, blocks separated by blank lines.
    if not turns or turns[-1].role != "user":
        turns.append(_Turn("user"))
    turns[-1].blocks.append(block)
    turns[-1].is_result.append(call_index >= 0)
    turns[-1].result_order.append(call_index)


def _order_tool_results(turn: _Turn) -> None:
    # Tool results go in the order of the calls; text blocks keep their places.
    slots = [k for k, order in enumerate(turn.result_order) if order >= 0]
    ordered = sorted(slots, key=lambda k: turn.result_order[k])
    blocks = list(turn.blocks)
    for slot, source in zip(slots, ordered):
        blocks[slot] = turn.blocks[source]
    turn.blocks = blocks


def _assistant_turn(msg: dict, where: str, turns: list[_Turn], encoding: str
                    ) -> tuple[_Turn, list[str | None]]:
    previous = turns[-1].role if turns else None
    if previous not in ("user", "developer", "latest_reminder"):
        raise ValueError(f"{where}: an assistant message must follow a user, developer or tool "
                         f"message, not {previous or 'the start of the conversation'}")
    calls, ids = _tool_calls(msg.get("tool_calls") or [], f"{where}.tool_calls", encoding)
    content = msg.get("content")
    if content is None and not calls:
        raise ValueError(f"{where}.content: missing (an assistant message without tool_calls "
                         "needs content, possibly empty)")
    text = "" if content is None else _text_of(content, f"{where}.content")
    reasoning = msg.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"{where}.reasoning_content: expected a string, "
                         f"got {type(reasoning).__name__}")
    if encoding == "v4":
        # The official encoder writes a message's calls (and so their results) sorted by id;
        # the ids it hands out (call_00_..., call_01_...) sort in call order.
        order = sorted(range(len(calls)), key=lambda j: ids[j] or "")
        calls, ids = [calls[j] for j in order], [ids[j] for j in order]
    prefix = bool(msg.get("prefix"))
    if prefix and calls:
        raise ValueError(f"{where}.prefix: an assistant message with tool_calls cannot be "
                         "continued")
    return _Turn("assistant", text=text, reasoning=reasoning or "", calls=calls,
                 prefix=prefix), ids


def _attach_tools(turns: list[_Turn], tools: list[dict] | None, encoding: str) -> None:
    """Request-level tools go into the first system message, or a new empty one before it."""
    if not tools:
        return
    functions = _tool_functions(tools, "tools", encoding)
    if turns[0].role == "system":
        if turns[0].tools:
            raise ValueError("tools: given both as an argument and in a system message's tools")
        turns[0].tools = functions
    else:
        turns.insert(0, _Turn("system", tools=functions))


def _response_format_section(response_format: Any, encoding: str) -> str:
    """The system-prompt section for OpenAI's `response_format` (V4 only). The format is
    asked for in the prompt; nothing constrains the decoding."""
    if response_format is None:
        return ""
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ValueError(f"response_format: expected {{'type': ...}}, got {response_format!r:.80}")
    kind = response_format["type"]
    if kind not in ("text", "json_object", "json_schema", "regex"):
        raise ValueError(f"response_format.type: {kind!r} is not one of text, json_object, "
                         "json_schema, regex")
    if kind in ("text", "regex"):
        return ""  # the official encoder adds no text for these
    if encoding != "v4":
        raise ValueError(f"response_format: {kind!r} is not part of the {encoding} encoding "
                         "(use encoding='v4')")
    if kind == "json_object":
        return JSON_OBJECT_SECTION
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError("response_format.json_schema.schema: missing or not an object")
    return JSON_SCHEMA_SECTION + _to_json(spec["schema"], "response_format.json_schema.schema")


def _add_response_format(turns: list[_Turn], section: str) -> None:
    if not section:
        return
    if turns[0].role != "system":
        turns.insert(0, _Turn("system"))
    turns[0].response_format = section


def _opens_reply(role: str) -> bool:
    return role in ("user", "developer", "latest_reminder")


def _last_user_index(turns: list[_Turn]) -> int:
    return max((k for k, t in enumerate(turns) if _opens_reply(t.role)), default=-1)


def _render_tool_calls(out: _PromptBuilder, calls: list[tuple[str, dict | str]],
                       encoding: str) -> None:
    # Strings go in raw (string="true"), everything else as JSON (string="false").
    out.template(f"\n\n{TOOL_CALLS_OPEN}\n")
    for k, (name, arguments) in enumerate(calls):
        if k:
            out.template("\n")
        out.template(f'<{DSML}invoke name="')
        out.text(name)
        out.template('">\n')
        if isinstance(arguments, str):
            arguments = {"arguments": arguments}
        for j, (key, value) in enumerate(arguments.items()):
            if j and encoding != "v4":
                out.template("\n")
            is_string = isinstance(value, str)
            out.template(f'<{DSML}parameter name="')
            out.text(key)
            out.template(f'" string="{str(is_string).lower()}">')
            out.text(value if is_string else _to_json(value, key, encoding))
            out.template(PARAMETER_CLOSE)
            if encoding == "v4":
                out.template("\n")
        # The preview writes "\n" between parameters and before </invoke> (so "\n\n" for a call
        # without arguments); V4 ends every parameter line with "\n".
        out.template(INVOKE_CLOSE if encoding == "v4" else f"\n{INVOKE_CLOSE}")
    out.template(f"\n{TOOL_CALLS_CLOSE}")


def _render_system(out: _PromptBuilder, turn: _Turn, encoding: str) -> None:
    out.text(turn.text)
    if turn.tools:  # one JSON schema per line; the schemas are user text
        head, _, tail = TOOLS_SECTION.partition("{schemas}")
        out.template("\n\n" + head)
        out.text("\n".join(_to_json(function, "tools", encoding) for function in turn.tools))
        out.template(tail)
    if turn.response_format.startswith(JSON_SCHEMA_SECTION):  # the schema is user text
        out.template(JSON_SCHEMA_SECTION)
        out.text(turn.response_format[len(JSON_SCHEMA_SECTION):])
    else:
        out.template(turn.response_format)


def _render_turn(out: _PromptBuilder, turn: _Turn, keep_reasoning: bool, thinking: bool,
                 encoding: str) -> None:
    if turn.role == "system":
        _render_system(out, turn, encoding)
    elif turn.role == "developer":
        out.markup(USER)
        _render_system(out, turn, encoding)
    elif turn.role == "latest_reminder":
        out.markup(LATEST_REMINDER)
        out.text(turn.text)
    elif turn.role == "user":
        out.markup(USER)
        blocks = list(zip(turn.blocks, turn.is_result))
        if encoding == "v4":
            blocks = _official_user_blocks(blocks)
        for k, (block, is_result) in enumerate(blocks):
            out.text("\n\n" if k else "")
            if is_result:
                out.template("<tool_result>")
                out.text(block)
                out.template("</tool_result>")
            else:
                out.text(block)
    elif turn.prefix:
        # Prefix completion: the reply so far, left open for the model to continue.
        if thinking:
            out.markup(THINK_START)
            out.text(turn.reasoning)
        out.markup(THINK_END)
        out.text(turn.text)
    else:
        out.generated = True
        if keep_reasoning:
            out.text(turn.reasoning)
            out.markup(THINK_END)
        out.text(turn.text)
        if turn.calls:
            _render_tool_calls(out, turn.calls, encoding)
        out.markup(EOS)
        out.generated = False


def _official_user_blocks(blocks: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """V4's user turn: the tool results, then the user messages' text as one block (the
    non-empty ones joined by blank lines; present, even empty, if there was a user message)."""
    results = [(block, True) for block, is_result in blocks if is_result]
    texts = [block for block, is_result in blocks if not is_result]
    if not texts:
        return results
    return [*results, ("\n\n".join(text for text in texts if text), False)]


def _effort_prefix(thinking: bool, reasoning_effort: str | None, encoding: str) -> str:
    """The reasoning-effort instruction after BOS.

    V4 (today's official encoding): none with thinking off; minimal and low add nothing; no
    effort, medium, high and xhigh add "Absolute maximum"; max adds "Beyond maximum". The April
    preview: only max adds its instruction (the "Absolute maximum" text)."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort: {reasoning_effort!r} is not one of "
                         f"{[e for e in REASONING_EFFORTS if e]}")
    if not thinking:
        return ""
    if reasoning_effort == "none":
        raise ValueError("reasoning_effort: 'none' turns thinking off; pass thinking=False")
    if encoding == "v4-preview":
        return THINK_MAX_INSTRUCTION if reasoning_effort in ("max", "xhigh") else ""
    if reasoning_effort in ("minimal", "low"):
        return ""
    return EFFORT_BEYOND_MAXIMUM if reasoning_effort == "max" else EFFORT_ABSOLUTE_MAXIMUM


def encode_chat_pieces(messages: list[dict], *, thinking: bool = False,
                       reasoning_effort: str | None = None, tools: list[dict] | None = None,
                       add_generation_prompt: bool = True, drop_thinking: bool = True,
                       encoding: str = "v4", response_format: dict | None = None
                       ) -> list[Piece]:
    """The prompt as `Piece`s: markup (one special token each) and plain text, in order.

    This is where every prompt of the project is laid out; `encode_chat` joins the pieces,
    `encode_chat_ids` tokenizes them. See `encode_chat` for the arguments.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding: {encoding!r} is not one of {list(ENCODINGS)}")
    effort = _effort_prefix(thinking, reasoning_effort, encoding)
    turns = _normalize(messages, encoding)
    _attach_tools(turns, tools, encoding)
    _add_response_format(turns, _response_format_section(response_format, encoding))
    last = turns[-1]
    if last.role == "assistant" and add_generation_prompt and not last.prefix:
        raise ValueError(f"messages[{len(messages) - 1}]: the conversation ends with an "
                         "assistant message; set \"prefix\": true on it to have it continued, "
                         "or end with a user or tool message")
    # Interleaved thinking (V4 report, agentic post-training): with tools defined, reasoning is
    # kept in every turn.
    drop = drop_thinking and not any(t.tools for t in turns)
    if thinking and drop and encoding == "v4-preview":
        # Earlier turns' reasoning is dropped, and so are developer messages before the last
        # user turn (they steered a turn that is over).
        last_user = _last_user_index(turns)
        turns = [t for k, t in enumerate(turns) if t.role != "developer" or k >= last_user]
    last_user = _last_user_index(turns)

    out = _PromptBuilder()
    out.markup(BOS)
    out.text(effort)
    for k, turn in enumerate(turns):
        keep_reasoning = thinking and (not drop or k > last_user)
        following = turns[k + 1] if k + 1 < len(turns) else None
        _render_turn(out, turn, keep_reasoning, thinking, encoding)
        opens_reply = (following is not None and following.role == "assistant") or (
            following is None and add_generation_prompt)
        if _opens_reply(turn.role) and opens_reply:
            out.markup(ASSISTANT)
            if following is None or not following.prefix:
                think_now = thinking and (not drop or k >= last_user)
                out.markup(THINK_START if think_now else THINK_END)
    return out.pieces


def encode_chat_segments(messages: list[dict], *, thinking: bool = False,
                         reasoning_effort: str | None = None, tools: list[dict] | None = None,
                         add_generation_prompt: bool = True, drop_thinking: bool = True,
                         encoding: str = "v4", response_format: dict | None = None
                         ) -> list[tuple[str, bool]]:
    """`encode_chat`, cut into (text, generated) pieces that concatenate to the prompt.

    `generated` is True for each assistant turn's text (reasoning, `</think>`, content, tool calls
    and EOS): exactly what the model produces after `<｜Assistant｜><think>` (or `</think>`), so
    SFT can put its loss there and nowhere else.
    """
    merged: list[tuple[str, bool]] = []
    for piece in encode_chat_pieces(
            messages, thinking=thinking, reasoning_effort=reasoning_effort, tools=tools,
            add_generation_prompt=add_generation_prompt, drop_thinking=drop_thinking,
            encoding=encoding, response_format=response_format):
        if merged and merged[-1][1] == piece.generated:
            merged[-1] = (merged[-1][0] + piece.text, piece.generated)
        else:
            merged.append((piece.text, piece.generated))
    return merged


def encode_chat(messages: list[dict], *, thinking: bool = False,
                reasoning_effort: str | None = None, tools: list[dict] | None = None,
                add_generation_prompt: bool = True, drop_thinking: bool = True,
                encoding: str = "v4", response_format: dict | None = None) -> str:
    """OpenAI-format messages -> the V4 prompt string.

    encoding: "v4" (default) is today's official DeepSeek-V4 encoding, byte for byte what
    DeepSeek's `deepseek-recipe` renders; "v4-preview" is the April preview encoder
    (`encoding_dsv4.py`). messages: system, developer (a system message in "v4"), user (string
    or text parts), assistant (content, reasoning_content, tool_calls with JSON-string or dict
    arguments, `prefix: true` on a last assistant message to continue it), tool (content,
    tool_call_id) and, in "v4", latest_reminder messages; tool results are merged into the
    next user turn as <tool_result> blocks in call order. thinking: think mode (`<think>` opens
    the reply) or non-think (`</think>`). reasoning_effort: none, minimal, low, medium, high,
    xhigh or max (think mode only; see `_effort_prefix`). tools: OpenAI tool definitions,
    listed in the system prompt; with tools, reasoning is kept in all turns. response_format:
    OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
    ...}} adds the official section to the system prompt ("v4" only). add_generation_prompt:
    end with `<｜Assistant｜><think>` or `...</think>`; a conversation that ends with a
    complete assistant message is then refused (ValueError) rather than rendered after EOS.
    drop_thinking: drop reasoning of turns before the last user message (think mode without
    tools). Bad messages raise ValueError naming the message index and field.
    """
    return "".join(piece.text for piece in encode_chat_pieces(
        messages, thinking=thinking, reasoning_effort=reasoning_effort, tools=tools,
        add_generation_prompt=add_generation_prompt, drop_thinking=drop_thinking,
        encoding=encoding, response_format=response_format))


def pieces_to_ids(tokenizer: Any, pieces: list[Piece]) -> tuple[list[int], list[bool]]:
    """Token ids of `pieces` and, per id, whether it is generated text.

    Markup becomes its one id; each run of plain text between two markup pieces is tokenized
    as a whole with `tokenizer.encode_plain`, without the special-token vocabulary, so text in
    a message that spells `<｜User｜>` or `</think>` stays text (no control-token injection).
    """
    ids: list[int] = []
    generated: list[bool] = []
    run: list[Piece] = []

    def flush() -> None:
        if run:
            piece_ids = tokenizer.encode_plain("".join(p.text for p in run))
            ids.extend(piece_ids)
            generated.extend([run[0].generated] * len(piece_ids))
            run.clear()

    for piece in pieces:
        if not piece.markup:
            if run and run[-1].generated != piece.generated:
                flush()  # never join prompt and generated text in one token
            run.append(piece)
            continue
        flush()
        token_id = tokenizer.token_to_id(piece.text)
        if token_id is None:
            raise ValueError(f"the tokenizer has no id for the chat markup {piece.text!r}: it "
                             "is not a DeepSeek-V4 tokenizer")
        ids.append(token_id)
        generated.append(piece.generated)
    flush()
    return ids, generated


def encode_chat_ids(tokenizer: Any, messages: list[dict], *, thinking: bool = False,
                    reasoning_effort: str | None = None, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, drop_thinking: bool = True,
                    encoding: str = "v4", response_format: dict | None = None) -> list[int]:
    """The prompt token ids of `encode_chat(messages, ...)`, built from its pieces: markup as
    special-token ids, message text tokenized as plain text (`pieces_to_ids`). `tokenizer`:
    a `dsv4.text.tokenizer.Tokenizer` (anything with `encode_plain` and `token_to_id`)."""
    pieces = encode_chat_pieces(
        messages, thinking=thinking, reasoning_effort=reasoning_effort, tools=tools,
        add_generation_prompt=add_generation_prompt, drop_thinking=drop_thinking,
        encoding=encoding, response_format=response_format)
    return pieces_to_ids(tokenizer, pieces)[0]


# ---- parsing -----------------------------------------------------------------------------
# What opens a DSML tag. The model writes `<｜DSML｜` (｜DSML｜ is one token), but models and
# quantized runs also produce an ASCII "|" for "｜" and a space after "<" or "/"; all of these
# are read as tags, so none of them can leak into content or arguments.
_DSML_BARS = (DSML, "|DSML|")
_TAG_STARTS = tuple(f"{opener}{bar}" for bar in _DSML_BARS
                    for opener in ("<", "</", "< ", "</ ", "< /"))
# Markers that end reasoning/content text. A DSML tag starts the tool-call block (the blank
# line the encoder puts before it is layout, not content); every other special string is
# markup the user must never see.
_TOOLS_MARKERS = (*(f"\n\n{start}" for start in _TAG_STARTS), *_TAG_STARTS)
_TEXT_MARKERS = (*_TOOLS_MARKERS, *SPECIAL_STRINGS)
_MAX_MARKER = max(len(m) for m in _TEXT_MARKERS)
# What ends a parameter value: the next DSML tag (its own close tag, normally) or EOS.
_VALUE_ENDS = (*_TAG_STARTS, EOS)
_MAX_VALUE_END = max(len(m) for m in _VALUE_ENDS)
_TAG_RE = re.compile(r"<\s*(/?)\s*[｜|]DSML[｜|]\s*(tool_calls|invoke|parameter)\b(.*)>",
                     re.DOTALL)
_ATTRIBUTE_RE = re.compile(r'\s*(\w+)\s*=\s*"(.*?)"', re.DOTALL)
# The spelling the encoder writes; any other accepted spelling is repaired and reported.
_CANONICAL_TAG_RE = re.compile(rf'</?{DSML}(tool_calls|invoke|parameter)'
                               r'( name="[^"]*"( string="[^"]*")?)?>', re.DOTALL)
_SPACE = " \t\r\n"
_MAX_TAG = 1024


def _first_marker(text: str) -> tuple[int, str] | None:
    """The leftmost marker in `text` (the longest one where several start at the same place)."""
    best: tuple[int, str] | None = None
    for marker in _TEXT_MARKERS:
        at = text.find(marker)
        if at != -1 and (best is None or at < best[0]
                         or (at == best[0] and len(marker) > len(best[1]))):
            best = (at, marker)
    return best


def _undecided_from(text: str, markers: tuple[str, ...] = _TEXT_MARKERS,
                    longest: int = _MAX_MARKER) -> int:
    """Where the suffix of `text` that could still grow into a marker begins (len if none)."""
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(marker.startswith(tail) for marker in markers):
            return start
    return len(text)


def _first_of(text: str, markers: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest of `markers` in `text[start:]`, -1 if none."""
    hits = [at for marker in markers if (at := text.find(marker, start)) != -1]
    return min(hits, default=-1)


def _tag_end(text: str) -> int:
    """Index of the '>' closing the tag at the start of `text`, ignoring quoted ones; -1 if the
    tag is not complete yet."""
    quoted = False
    for k, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return k
    return -1


def _parse_tag(tag: str) -> tuple[bool, str, dict[str, str]] | None:
    """(closing, kind, attributes) of a DSML tag in any of the spellings read; None if it is
    not one of tool_calls, invoke, parameter."""
    match = _TAG_RE.fullmatch(tag)
    if match is None:
        return None
    attributes = dict(_ATTRIBUTE_RE.findall(match.group(3)))
    return match.group(1) == "/", match.group(2), attributes


@dataclass
class _OpenInvoke:
    name: str
    arguments: dict = field(default_factory=dict)
    raw: list[str] = field(default_factory=list)  # the text it was read from
    parameter: tuple[str, str | None, str] | None = None  # read, waiting for its close tag


class StreamParser:
    """Incremental parser of a V4 completion: feed text deltas, get message deltas.

    Events: {"reasoning_content": str}, {"content": str}, {"tool_call": {"id", "type",
    "function": {"name", "arguments"}}} (the n-th tool_call event is call index n) and
    {"unparsed": str}: text of a tool-call block that could not become a call (a nameless or
    cut-off invoke, an unknown tag, loose text), never put in content by the parser; the server
    shows it to the client. Text is emitted as soon as it cannot be part of a marker; a tool call
    once its invoke is over, with complete arguments that are valid JSON.

    The parser fails closed: no markup ever reaches reasoning, content or arguments, and every
    invoke becomes a call or is reported. Repaired on the way, each noted in `problems`: a
    missing `</｜DSML｜parameter>` or `</｜DSML｜invoke>` (the next tag, `</｜DSML｜tool_calls>`,
    EOS or the end closes it), an ASCII "|" for "｜" or spaces in tags, tool calls opened before
    `</think>`, a non-JSON value of a string="false" parameter (kept as a string). Everything
    after EOS is ignored; `finished` says whether EOS was seen.
    """

    def __init__(self, *, thinking: bool, call_id_prefix: str = "call_") -> None:
        self._phase = "reasoning" if thinking else "content"  # or "tools", "done"
        self._text_phase = self._phase  # where a stray DSML tag outside a block returns to
        self._buffer = ""
        self._events: list[dict] = []
        self._call_id_prefix = call_id_prefix
        self._calls = 0
        self._in_block = False
        self._invoke: _OpenInvoke | None = None
        self._after_tools = False  # a tool_calls block just closed: only EOS should follow
        self._loose = False  # inside text of the block that is not a tag (see _loose_text)
        self._loose_space = ""
        # An open parameter value (possibly a whole file) is collected here, not re-scanned on
        # every delta, until something that ends it can be in the text: linear, not quadratic.
        self._value_parts: list[str] = []
        self._value_tail = ""  # the last characters of those parts
        self.problems: list[str] = []
        self.finished = False

    def feed(self, delta: str) -> list[dict]:
        """Consume the next piece of completion text; return the events it made certain."""
        if not isinstance(delta, str):
            raise TypeError(f"delta: expected str, got {type(delta).__name__}")
        if self._value_parts:
            window = self._value_tail + delta
            self._value_parts.append(delta)
            self._value_tail = window[-_MAX_VALUE_END:]
            if _first_of(window, _VALUE_ENDS) == -1:
                return []
            self._buffer, self._value_parts = "".join(self._value_parts), []
        else:
            self._buffer += delta
        self._advance(final=False)
        return self._take_events()

    def finish(self, *, cut_off: bool = False) -> list[dict]:
        """End of the completion: flush held-back text and settle an open tool call.

        cut_off: the generation was stopped by a length limit, so an invoke still open at the
        end is incomplete and is dropped (reported), never returned as a call.
        """
        self._buffer, self._value_parts = "".join(self._value_parts) + self._buffer, []
        self._advance(final=True)
        if self._phase == "reasoning":
            self._problem("the reasoning was never closed with </think>")
        elif self._phase == "tools":
            if self._invoke is not None and cut_off:
                self._drop_invoke("was cut off by the length limit")
            if self._in_block:
                self._problem(f"the tool_calls block was never closed with {TOOL_CALLS_CLOSE}")
            self._close_block(by="the end of the completion")
        self._phase = "done"
        return self._take_events()

    # -- internals --
    def _take_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def _add_event(self, key: str, text: str) -> None:
        if not text:
            return
        if self._events and key in self._events[-1]:
            self._events[-1] = {key: self._events[-1][key] + text}
        else:
            self._events.append({key: text})

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        if self._after_tools:
            self._problem("text after the tool calls was kept as content")
            self._after_tools = False
        self._add_event("reasoning_content" if self._phase == "reasoning" else "content", text)

    def _consume(self, count: int) -> str:
        """Take `count` characters of the tool-call block off the buffer, noting them as the
        raw text of the open invoke."""
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        if self._invoke is not None:
            self._invoke.raw.append(taken)
        return taken

    def _advance(self, final: bool) -> None:
        while True:
            if self._phase in ("reasoning", "content"):
                progressed = self._text_step(final)
            elif self._phase == "tools":
                progressed = self._tools_step(final)
            else:
                if self._buffer.strip(_SPACE):
                    self._problem("text after the end-of-sentence token was ignored")
                self._buffer = ""
                return
            if not progressed:
                return

    def _text_step(self, final: bool) -> bool:
        if self._after_tools:
            # Layout whitespace between the block and EOS is not content.
            self._buffer = self._buffer.lstrip(_SPACE)
            if not self._buffer:
                return False
        hit = _first_marker(self._buffer)
        if hit is None:
            keep = len(self._buffer) if final else _undecided_from(self._buffer)
            self._emit_text(self._buffer[:keep])
            self._buffer = self._buffer[keep:]
            return False
        at, marker = hit
        self._emit_text(self._buffer[:at])
        rest = self._buffer[at + len(marker):]
        if marker in _TOOLS_MARKERS:
            self._text_phase, self._phase = self._phase, "tools"
            self._buffer = marker.lstrip("\n") + rest  # the tag itself is parsed as a tag
            return True
        self._buffer = rest
        if marker == EOS:
            self._phase = "done"
            self.finished = True
        elif marker == THINK_END and self._phase == "reasoning":
            self._phase = "content"
        else:
            self._problem(f"stray {marker} dropped from the {self._phase.replace('_', ' ')}")
        return True

    def _tools_step(self, final: bool) -> bool:
        text = self._buffer
        space = len(text) - len(text.lstrip(_SPACE))  # whitespace between tags is layout
        if space and not self._loose:
            self._consume(space)
            text = self._buffer
        if not text:
            return False
        if text.startswith((EOS, *_TAG_STARTS)):
            self._loose, self._loose_space = False, ""
        if text.startswith(EOS):
            self._buffer = text[len(EOS):]
            self._close_block(by="the end-of-sentence token")
            self._phase = "done"
            self.finished = True
            return True
        if text.startswith(_TAG_STARTS):
            progressed = self._tag_step(final)
            if progressed and self._phase == "tools" and not self._in_block:
                self._phase = self._text_phase  # a stray tag: back to the text it interrupted
            return progressed
        if not final and any(m.startswith(text) for m in (*_TAG_STARTS, EOS)):
            return False  # may still become a tag
        self._problem("unexpected text inside the tool_calls block was not parsed")
        ends = (*_TAG_STARTS, EOS)
        next_tag = _first_of(text, ends, 1)
        if next_tag == -1:  # up to where a tag could still begin
            next_tag = len(text) if final else _undecided_from(text, ends, _MAX_VALUE_END)
        self._loose_text(self._consume(next_tag))
        return True

    def _loose_text(self, text: str) -> None:
        # Loose text runs to the next tag; its trailing whitespace is held until more text
        # shows it is inside the run (layout before a tag is not part of it), so every
        # chunking yields the same unparsed text.
        self._loose = True
        body = text.rstrip(_SPACE)
        if body:
            self._unparsed(self._loose_space + body)
            self._loose_space = text[len(body):]
        else:
            self._loose_space += text

    def _unparsed(self, text: str) -> None:
        if self._invoke is None:  # inside an invoke, the invoke's raw text covers it
            self._add_event("unparsed", text)

    def _tag_step(self, final: bool) -> bool:
        text = self._buffer
        # A real tag is short; one without its '>' in the first _MAX_TAG characters is broken
        # (judged on the text alone, so every chunking agrees, and never rescanned at length).
        end = _tag_end(text[:_MAX_TAG])
        if end == -1:
            if len(text) < _MAX_TAG and not final:
                return False
            if len(text) < _MAX_TAG:
                self._problem("a DSML tag cut off at the end was not parsed")
                self._unparsed(self._consume(len(text)))
                return True
            # The tag as far as it was read (up to the next tag), then text goes on.
            self._problem("an overlong DSML tag was not parsed")
            next_tag = _first_of(text[:_MAX_TAG], (*_TAG_STARTS, EOS), 1)
            self._unparsed(self._consume(_MAX_TAG if next_tag == -1 else next_tag))
            return True
        tag = text[:end + 1]
        parsed = _parse_tag(tag)
        if parsed is not None and not _CANONICAL_TAG_RE.fullmatch(tag):
            self._problem(f"the irregular DSML tag {tag[:60]!r} (an ASCII '|' or extra spaces) "
                          "was read as a tag")
        if parsed is not None and not parsed[0] and parsed[1] == "parameter":
            return self._parameter_step(end, parsed[2], final)
        settled = self._settle_parameter(
            closed=parsed is not None and parsed[:2] == (True, "parameter"))
        if parsed is None:
            self._problem(f"an unknown DSML tag {tag[:60]!r} was not parsed")
            self._unparsed(self._consume(end + 1))
            return True
        closing, kind, attributes = parsed
        if kind == "tool_calls" and not closing:
            self._consume(end + 1)
            self._open_block()
        elif kind == "tool_calls":
            if self._in_block:
                self._consume(end + 1)
                self._close_block(by=TOOL_CALLS_CLOSE)
                self._phase = "content"  # reasoning, if it was still open, is over
                self._after_tools = True
            else:
                self._problem(f"a stray {TOOL_CALLS_CLOSE} was dropped")
                self._consume(end + 1)
        elif kind == "invoke" and not closing:
            self._open_invoke(attributes.get("name", ""), end + 1)
        elif kind == "invoke":
            self._consume(end + 1)
            if self._invoke is None:
                self._problem(f"a stray {INVOKE_CLOSE} was dropped")
            else:
                self._close_invoke()
        else:  # </parameter>
            if not settled:
                self._problem(f"a stray {PARAMETER_CLOSE} was dropped")
            self._consume(end + 1)
        return True

    def _parameter_step(self, end: int, attributes: dict[str, str], final: bool) -> bool:
        """A parameter tag: its value runs to the next DSML tag (its close tag, normally), EOS
        or the end of the text."""
        self._settle_parameter(closed=False)
        text = self._buffer
        stop = _first_of(text, _VALUE_ENDS, end + 1)
        if stop == -1 and not final:
            self._value_parts, self._value_tail = [text], text[-_MAX_VALUE_END:]
            self._buffer = ""
            return False
        stop = len(text) if stop == -1 else stop
        value = text[end + 1:stop]
        self._consume(stop)
        if self._invoke is None:
            self._problem("a parameter outside an invoke was not parsed")
            self._add_event("unparsed", text[:stop])
            return True
        self._invoke.parameter = (attributes.get("name", ""), attributes.get("string"), value)
        return True

    def _settle_parameter(self, closed: bool) -> bool:
        """Add the parameter read last to the open invoke, now that the next tag shows whether
        it was closed; False if there was none."""
        if self._invoke is None or self._invoke.parameter is None:
            return False
        name, string, value = self._invoke.parameter
        self._invoke.parameter = None
        if not closed:
            self._problem(f"parameter {name!r} of {self._invoke.name!r} was not closed with "
                          f"{PARAMETER_CLOSE}: it ends at the next tag")
            value = value.removesuffix("\n")  # the layout newline before the next tag
        self._add_parameter(name, string, value)
        return True

    def _open_block(self) -> None:
        if self._in_block:
            self._problem(f"a nested {TOOL_CALLS_OPEN} was ignored")
            return
        if self._text_phase == "reasoning":
            self._problem("tool calls began inside the reasoning, before </think>")
        self._in_block = True

    def _open_invoke(self, name: str, tag_length: int) -> None:
        if not self._in_block:
            self._problem(f"an invoke outside {TOOL_CALLS_OPEN} was accepted")
            self._open_block()
        if self._invoke is not None:
            self._problem(f"the invoke of {self._invoke.name!r} was not closed with "
                          f"{INVOKE_CLOSE}: it ends at the next invoke")
            self._close_invoke()
        self._invoke = _OpenInvoke(name)
        self._consume(tag_length)

    def _add_parameter(self, name: str, string: str | None, value: str) -> None:
        arguments = self._invoke.arguments
        if name in arguments:
            self._problem(f"duplicate parameter {name!r}: the last value was kept")
        if string == "true":
            arguments[name] = value
            return
        if string != "false":
            self._problem(f'parameter {name!r} has no string="true|false": read as JSON if it '
                          "parses, else as a string")
        try:
            arguments[name] = json.loads(value)
        except json.JSONDecodeError:
            if string == "false":
                self._problem(f"parameter {name!r} is not valid JSON: kept as a string")
            arguments[name] = value

    def _close_invoke(self) -> None:
        self._settle_parameter(closed=False)
        invoke, self._invoke = self._invoke, None
        if not invoke.name.strip() or any(c in invoke.name for c in '<>"\n'):
            self._problem(f"an invoke with the invalid tool name {invoke.name!r} was not parsed")
            self._add_event("unparsed", "".join(invoke.raw))
            return
        self._events.append({"tool_call": {
            "id": f"{self._call_id_prefix}{self._calls}",
            "type": "function",
            "function": {"name": invoke.name,
                         "arguments": json.dumps(invoke.arguments, ensure_ascii=False)},
        }})
        self._calls += 1

    def _drop_invoke(self, why: str) -> None:
        invoke, self._invoke = self._invoke, None
        self._problem(f"the invoke of {invoke.name!r} {why} and was not returned")
        self._add_event("unparsed", "".join(invoke.raw))

    def _close_block(self, by: str) -> None:
        if self._invoke is not None:
            self._problem(f"the invoke of {self._invoke.name!r} was not closed with "
                          f"{INVOKE_CLOSE}: it ends at {by}")
            self._close_invoke()
        self._in_block = False


def collect_events(events: list[dict], *, thinking: bool,
                   problems: list[str] | None = None) -> dict:
    """Fold parser events into one OpenAI assistant message with its `problems` (the parser's
    list; empty for well-formed text). "unparsed" events are not content: they are reported."""
    reasoning, content, calls = [], [], []
    for event in events:
        if "reasoning_content" in event:
            reasoning.append(event["reasoning_content"])
        elif "content" in event:
            content.append(event["content"])
        elif "tool_call" in event:
            calls.append(event["tool_call"])
    return {"role": "assistant", "content": "".join(content),
            "reasoning_content": "".join(reasoning) if thinking else None, "tool_calls": calls,
            "problems": list(problems or [])}


def parse_completion(text: str, *, thinking: bool, strict: bool = False,
                     call_id_prefix: str = "call_", cut_off: bool = False) -> dict:
    """Completion text (what the model generated after the prompt, EOS optional) -> message.

    Returns {"role": "assistant", "content": str, "reasoning_content": str (think mode) or None,
    "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON string}}],
    "problems": [str]}. string="true" parameters become strings, the others are JSON-decoded.
    No DSML markup is ever in content, reasoning or arguments: malformed output is repaired or
    left out as `StreamParser` does, and every repair or omission is listed in `problems`
    (empty when the text was well formed); with strict=True it raises ValueError instead.
    cut_off: the text was stopped by a length limit, so a tool call still open at its end is
    incomplete: it is reported, not returned.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    parser = StreamParser(thinking=thinking, call_id_prefix=call_id_prefix)
    events = parser.feed(text) + parser.finish(cut_off=cut_off)
    if strict and parser.problems:
        raise ValueError("malformed completion: " + "; ".join(parser.problems))
    return collect_events(events, thinking=thinking, problems=parser.problems)
