"""The OpenAI request and error formats: validation of raw JSON bodies into plain settings.

Bodies are checked by hand, not by a pydantic model, so that every bad value gets an OpenAI
error body naming the parameter ({"error": {"message", "type", "param", "code"}}) and never
FastAPI's 422 shape. Unknown parameters are refused (400) rather than silently ignored, except
a few that change nothing here (`user`, `metadata`, `store`, ...).

Reasoning modes (V4 report: Non-think, Think High, Think Max): `reasoning_effort` none turns
thinking off; the other efforts (minimal, low, medium, high, xhigh, max) turn it on and go to
the chat encoding as they are (`dsv4.text.chat.encode_chat` decides what each adds to the
prompt). A `thinking` switch is also accepted: `true`/`false`, DeepSeek's
`{"type": "enabled" | "disabled"}`, or `chat_template_kwargs: {"thinking": bool}`. With neither,
a request is non-think.
`response_format` (text, json_object, json_schema, regex) adds the official prompt section; the
output itself is not constrained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dsv4.model.config import is_int

NON_THINK_EFFORTS = ("none",)
THINK_EFFORTS = ("minimal", "low", "medium", "high", "xhigh", "max")
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5  # completions: top-N alternatives (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs (OpenAI's limit)

# Bounds on what one request or connection may take (enforced in limits.py; here so that the
# command line quotes them without importing the web stack).
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_JSON_DEPTH = 64  # OpenAI bodies nest a few levels; tool schemas a few more

# Accepted and without effect on a single local model.
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


class APIError(Exception):
    """An error returned to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


# ---- settings handed to the serving code --------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None  # None: up to the cache capacity
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # text or token ids, one choice group per prompt
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling
    thinking: bool = False
    effort: str | None = None  # the request's reasoning_effort in think mode, for encode_chat
    tools: list[dict] | None = None
    response_format: dict | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top_logprobs when `logprobs: true`, else None


# ---- type checks ---------------------------------------------------------------------------
def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise bad(name, f"expected a number, got {value!r}", "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad(name, f"{value!r} is out of range: must be in {bracket}{low}, {high}]")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None
             ) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise bad(name, f"expected an integer, got {value!r}", "invalid_type")
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"{value!r} is out of range: must be {limit}")
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {value!r}", "invalid_type")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"expected a non-empty string or a list of them, got {stop!r}",
                  "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return stops


def _refuse_unsupported(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if value in (None, 0, 0.0, 1.0 if name == "repetition_penalty" else 0):
                continue
            raise bad(name, f"{value!r}: penalties are not supported (only the neutral value)",
                      "unsupported_parameter")
        if name == "logit_bias" and not value:
            continue
        raise bad(name, "unknown or unsupported parameter", "unsupported_parameter")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise bad("stream_options", f"expected {{'include_usage': bool}}, got {options!r}",
                  "invalid_type")
    if not stream:
        raise bad("stream_options", "only allowed with stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options.include_usage", f"expected true or false, got {include!r}",
                  "invalid_type")
    return include


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is None:
        raise bad("model", "missing: give the served model's name (see GET /v1/models)",
                  "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"expected a string, got {model!r}", "invalid_type")
    if model != served:
        raise APIError(404, f"model: {model!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _sampling(body: dict, max_tokens_names: tuple[str, ...], default_max: int | None,
              min_tokens: int) -> Sampling:
    max_tokens = default_max
    for name in max_tokens_names:
        value = _integer(body, name, None, min_tokens)
        if value is not None:
            max_tokens = value
    top_k = _integer(body, "top_k", 0, -1)
    return Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean no top-k filter
        max_tokens=max_tokens,
        seed=_integer(body, "seed", None, 0, 2**63 - 1),
        stop=_stop(body),
        ignore_eos=_boolean(body, "ignore_eos", False),
        n=_integer(body, "n", 1, 1, 16),
    )


# ---- /v1/completions ---------------------------------------------------------------------------
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n",
                     "stream", "stream_options", "stop", "seed", "echo", "logprobs",
                     "ignore_eos", "best_of"}


def parse_completion_request(body: Any, served: str, vocab_size: int) -> CompletionRequest:
    body = _object(body)
    check_model(body, served)
    _refuse_unsupported(body, COMPLETION_FIELDS)
    stream = _boolean(body, "stream", False)
    sampling = _sampling(body, ("max_tokens",), 16, 0)
    best_of = _integer(body, "best_of", None, 1)
    if best_of is not None and best_of != sampling.n:
        raise bad("best_of", f"{best_of}: only best_of == n is supported", "unsupported_parameter")
    request = CompletionRequest(
        prompts=_prompts(body.get("prompt"), vocab_size), sampling=sampling, stream=stream,
        include_usage=_stream_options(body, stream), echo=_boolean(body, "echo", False),
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS))
    if sampling.max_tokens == 0 and not request.echo:
        raise bad("max_tokens", "0 is only allowed with echo: true (scoring the prompt)")
    return request


def _prompts(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """A string, a list of token ids, or a list of either (one choice group each)."""
    if prompt is None:
        raise bad("prompt", "missing", "missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise bad("prompt", f"expected a non-empty string or list of token ids, got {prompt!r:.80}",
                  "invalid_type")
    for i, item in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise bad(where, "empty: give some text")
            continue
        if not isinstance(item, list) or not item or not all(is_int(t) for t in item):
            raise bad(where, f"expected a non-empty string or list of token ids, got {item!r:.80}",
                      "invalid_type")
        outside = [t for t in item if not 0 <= t < vocab_size]
        if outside:
            raise bad(where, f"token id {outside[0]} is outside the vocabulary [0, {vocab_size})")
    return prompts


# ---- /v1/chat/completions ----------------------------------------------------------------------
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "top_k", "n", "stream", "stream_options", "stop", "seed", "tools", "tool_choice",
               "reasoning_effort", "thinking", "chat_template_kwargs", "logprobs",
               "top_logprobs", "ignore_eos", "response_format"}


def parse_chat_request(body: Any, served: str) -> ChatRequest:
    body = _object(body)
    check_model(body, served)
    _refuse_unsupported(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"expected a non-empty list of messages, got {messages!r:.80}",
                  "invalid_type" if not isinstance(messages, list) else "invalid_value")
    stream = _boolean(body, "stream", False)
    thinking, effort = reasoning_mode(body)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("tools", f"expected a list of tools, got {tools!r:.80}", "invalid_type")
    tool_choice = body.get("tool_choice", "auto")
    if tool_choice not in ("auto", "none"):
        raise bad("tool_choice", f"{tool_choice!r:.80}: only 'auto' and 'none' are supported "
                  "(no constrained decoding)", "unsupported_parameter")
    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    return ChatRequest(
        messages=messages, sampling=_sampling(body, ("max_tokens", "max_completion_tokens"),
                                              None, 1),
        thinking=thinking, effort=effort,
        tools=(tools or None) if tool_choice == "auto" else None,
        response_format=_response_format(body),
        stream=stream, include_usage=_stream_options(body, stream),
        logprobs=(top or 0) if logprobs else None)


def _response_format(body: dict) -> dict | None:
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("response_format", f"expected {{'type': ...}}, got {value!r:.80}",
                  "invalid_type")
    return value


def reasoning_mode(body: dict) -> tuple[bool, str | None]:
    """(thinking, effort for encode_chat) from `reasoning_effort` and the thinking switch."""
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in (*NON_THINK_EFFORTS, *THINK_EFFORTS):
        raise bad("reasoning_effort", f"{effort!r}: expected one of "
                  f"{', '.join((*NON_THINK_EFFORTS, *THINK_EFFORTS))}")
    switch = _thinking_switch(body)
    if effort is None:
        return bool(switch), None
    thinking = effort not in NON_THINK_EFFORTS
    if switch is not None and switch != thinking:
        raise bad("reasoning_effort", f"{effort!r} contradicts thinking "
                  f"{'enabled' if switch else 'disabled'}")
    return thinking, effort if thinking else None


def _thinking_switch(body: dict) -> bool | None:
    value = body.get("thinking")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or set(kwargs) - {"thinking", "enable_thinking"}:
            raise bad("chat_template_kwargs", f"only {{'thinking': bool}} is supported, got "
                      f"{kwargs!r:.80}", "unsupported_parameter")
        value = kwargs.get("thinking", kwargs.get("enable_thinking")) if value is None else value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, dict) and value.get("type") in ("enabled", "disabled"):
        return value["type"] == "enabled"
    raise bad("thinking", f"expected true/false or {{'type': 'enabled'|'disabled'}}, got "
              f"{value!r:.80}", "invalid_type")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                       f"{type(body).__name__}", code="invalid_type")
    return body
