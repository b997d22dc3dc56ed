"""Any OpenAI-compatible server as an evaluation backend (`dsv4 eval --endpoint URL --model M`).

Requests go through the `openai` client, `concurrency` at a time (threads), each retried with
exponential backoff on rate limits (429), server errors (5xx), timeouts and refused
connections; any other error (400, 404, ...) is final and reported with the server's message.

Log-likelihood scoring needs the prompt's log-probabilities, which the legacy completions API
returns for `echo=True, max_tokens=0, logprobs=1` (vLLM, SGLang, `dsv4 serve` and others do;
many hosted APIs do not). `probe_logprobs()` asks once; suites that need it then either stop
with `LogprobsUnavailable` (ppl) or skip that metric with the reason in the results (mc).
The endpoint tokenizes the text itself, and its first prompt token has no log-probability
(nothing precedes it), so a text's first token is not scored there.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dsv4.evaluate.backends import (
    THINK_MODES,
    ContinuationScore,
    EvalError,
    LogprobsUnavailable,
    cut_at_stop,
)


class EndpointError(EvalError):
    """The endpoint failed a request for good (after retries, or a non-retryable status)."""


def api_base(url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> the client's base URL (ends in /v1)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EvalError(f"--endpoint {url!r}: expected an http(s) URL such as "
                        "http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class EndpointBackend:
    kind = "endpoint"

    def __init__(self, url: str, model: str, *, concurrency: int = 8, retries: int = 5,
                 timeout: float = 600.0, api_key: str | None = None,
                 backoff: float = 1.0, tokenizer=None):
        import openai

        self.openai = openai
        self.url, self.model_name = api_base(url), model
        self.label = f"{model} @ {self.url}"
        self.client = openai.OpenAI(base_url=self.url, timeout=timeout, max_retries=0,
                                    api_key=api_key or os.environ.get("OPENAI_API_KEY")
                                    or "EMPTY")
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.batch = concurrency
        self.tokenizer = tokenizer  # only to size NIAH prompts; None: estimate from bytes
        self.has_logprobs: bool | None = None
        self.logprobs_reason: str | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """One request, retried with backoff (1, 2, 4, ... s, capped at 30, with jitter) on
        429, 5xx, timeouts and connection errors."""
        o = self.openai
        retryable = (o.RateLimitError, o.InternalServerError, o.APIConnectionError)
        for attempt in range(self.retries + 1):
            try:
                return fn(model=self.model_name, **kwargs)
            except retryable as err:
                if attempt == self.retries:
                    raise EndpointError(f"{self.url}: {type(err).__name__} after "
                                        f"{self.retries + 1} attempts: {err}") from None
                delay = min(30.0, self.backoff * 2**attempt)
                time.sleep(delay * (0.5 + random.random() / 2))
            except o.APIStatusError as err:
                raise EndpointError(f"{self.url}: HTTP {err.status_code}: "
                                    f"{_message(err)}") from None
        raise AssertionError("unreachable")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """fn over items, `concurrency` at a time, results in order."""
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def count_tokens(self, text: str) -> int:
        """Tokens by the given tokenizer; without one, UTF-8 bytes / 4 (an estimate)."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return max(1, len(text.encode()) // 4)

    # -- log-probabilities ------------------------------------------------------------------
    def echo(self, prompt: str) -> Any:
        """The legacy `logprobs` object of `prompt`'s own tokens (echo, nothing generated)."""
        try:
            response = self.call(self.client.completions.create, prompt=prompt, echo=True,
                                 max_tokens=0, logprobs=1, temperature=0)
        except EndpointError as err:
            raise LogprobsUnavailable(
                f"{self.url} gave no prompt log-probabilities for model {self.model_name!r} "
                f"(completions with echo=true, max_tokens=0, logprobs=1 failed: {err})"
            ) from None
        choice = response.choices[0] if response.choices else None
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is None or not getattr(logprobs, "token_logprobs", None):
            raise LogprobsUnavailable(
                f"{self.url} returned no prompt log-probabilities for model "
                f"{self.model_name!r} (completions with echo=true, logprobs=1 came back without "
                "choices[0].logprobs.token_logprobs)")
        return logprobs

    def probe_logprobs(self) -> bool:
        """Whether the endpoint returns prompt log-probabilities (asked once)."""
        if self.has_logprobs is None:
            try:
                self.echo("The quick brown fox")
                self.has_logprobs = True
            except LogprobsUnavailable as err:
                self.has_logprobs, self.logprobs_reason = False, str(err)
        return self.has_logprobs

    def text_logprob(self, text: str) -> tuple[float, int]:
        """(sum of the text's token log-probabilities in nats, tokens scored): every token
        but the first, which has none."""
        lp = self.echo(text)
        values = [v for v in lp.token_logprobs[1:] if v is not None]
        return float(sum(values)), len(values)

    def continuation_logprobs(self, context: str, continuations: Sequence[str]
                              ) -> list[ContinuationScore]:
        return self.batch_continuation_logprobs([(context, continuations)])[0]

    def batch_continuation_logprobs(self, requests: Sequence[tuple[str, Sequence[str]]]
                                    ) -> list[list[ContinuationScore]]:
        """Every context + continuation echoed (all requests' pairs `concurrency` at a time);
        a continuation's tokens are those starting at or after the end of its context
        (`text_offset`)."""
        def score(pair: tuple[str, str]) -> ContinuationScore:
            context, continuation = pair
            lp = self.echo(context + continuation)
            offsets = lp.text_offset or []
            start = len(context)
            picked = [i for i, off in enumerate(offsets) if off >= start and i > 0]
            if not picked:
                raise EndpointError(f"{self.url}: could not find the continuation "
                                    f"{continuation!r} in the echoed tokens")
            total = sum(float(lp.token_logprobs[i]) for i in picked)
            greedy = True
            tops = lp.top_logprobs or []
            for i in picked:
                if i < len(tops) and tops[i]:
                    best = max(tops[i], key=tops[i].get)
                    greedy &= best == lp.tokens[i]
            return ContinuationScore(total, len(picked), greedy)

        pairs = [(context, c) for context, conts in requests for c in conts]
        flat = iter(self.map(score, pairs))
        return [[next(flat) for _ in conts] for _, conts in requests]

    # -- generation -------------------------------------------------------------------------
    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()
                 ) -> list[str]:
        def one(prompt: str) -> str:
            extra = {"stop": list(stop)[:4]} if stop else {}  # the API takes at most 4
            r = self.call(self.client.completions.create, prompt=prompt, max_tokens=max_tokens,
                          temperature=0, **extra)
            return cut_at_stop(r.choices[0].text or "", stop)

        return self.map(one, list(prompts))

    def chat(self, conversations: Sequence[list[dict]], think: str, max_tokens: int
             ) -> list[dict]:
        if think not in THINK_MODES:
            raise EvalError(f"think={think!r}: must be one of {', '.join(THINK_MODES)}")
        # DeepSeek's API switches thinking with extra_body thinking.type and reasoning_effort;
        # non-think sends neither, so servers without these parameters still work.
        extra: dict[str, Any] = {}
        if think != "none":
            extra = {"reasoning_effort": think,
                     "extra_body": {"thinking": {"type": "enabled"}}}

        def one(messages: list[dict]) -> dict:
            r = self.call(self.client.chat.completions.create, messages=messages,
                          max_tokens=max_tokens, temperature=0, **extra)
            message = r.choices[0].message
            return {"content": message.content or "",
                    "reasoning_content": getattr(message, "reasoning_content", None)}

        return self.map(one, list(conversations))


def _message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(err)
