"""The HTTP API: an OpenAI-compatible FastAPI app over a `Scheduler`.

    app = create_app(engine, tokenizer, served_model="nano")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(streaming as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`).

Decisions, documented where a client can see them:
- Text prompts of /v1/completions get BOS put in front (as `dsv4 generate` does); token-id
  prompts are used as given. With `echo` the echoed text is the prompt as sent, and the
  logprobs lists cover every scored token, BOS included (first entry: logprob null), BOS
  being zero-width in `text_offset`.
- `max_tokens` beyond what the request's cache slot can still hold is clipped: generation
  ends there with finish_reason "length". Without `max_tokens`, chat generates up to that
  limit and completions 16 tokens (OpenAI's legacy default).
- A prompt that leaves no room to generate is a 400 naming `prompt` / `messages`
  (code "context_length_exceeded"). Scoring only (`echo`, `max_tokens: 0`) runs through its
  own one-slot cache, chunk by chunk between engine steps (`scoring.py`): up to
  `max_score_tokens` tokens (default: the per-request capacity).
- Bounded work per request (`limits.py`): the body is size- and time-limited (413 / 408)
  before it is parsed; text longer than any tokenization of the token limit could be is
  refused before tokenizing it, and tokenizing runs off the event loop, so `/health` answers
  during any single request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dsv4.inference.engine import Engine, SamplingParams, decode_known
from dsv4.server.choices import ChatChoice, KnownTokens, TextChoice, token_offsets
from dsv4.server.limits import (
    LARGE_BODY_BYTES,
    ClientGone,
    ServerLimits,
    parse_json,
    read_body,
    release_free_memory,
)
from dsv4.server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    bad,
    parse_chat_request,
    parse_completion_request,
)
from dsv4.server.scheduler import Handle, Scheduler
from dsv4.text.chat import encode_chat_ids

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there


class Server:
    """What the endpoints share: the engine's scheduler, the tokenizer, the served name."""

    def __init__(self, engine: Engine, tokenizer, served_model: str, max_queue: int,
                 chat_encoding: str = "v4", limits: ServerLimits | None = None
                 ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_encoding = chat_encoding  # dsv4.text.chat.ENCODINGS
        self.known = KnownTokens(tokenizer)
        self.served_model = served_model
        self.limits = limits or ServerLimits()
        self.scheduler = Scheduler(engine, max_queue, self.limits.max_score_tokens)
        self.created = int(time.time())
        self.max_token_bytes = longest_token_bytes(tokenizer)

    @property
    def capacity(self) -> int:
        return self.engine.capacity

    @property
    def vocab_size(self) -> int:
        return self.engine.cfg.vocab_size

    # -- prompts and parameters -------------------------------------------------------------
    def prompt_limit(self, scoring_only: bool) -> int:
        return self.scheduler.scorer.max_tokens if scoring_only else self.capacity - 1

    def check_prompt(self, ids: list[int], param: str, scoring_only: bool = False) -> None:
        limit = self.prompt_limit(scoring_only)
        if len(ids) > limit:
            room = ("the scoring limit (dsv4 serve --max-score-tokens)" if scoring_only else
                    "the per-request cache capacity (leaving one token to generate)")
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, more than the "
                           f"{limit} that {room} allows", param=param,
                           code="context_length_exceeded")

    def check_text_size(self, text: str, param: str, scoring_only: bool = False) -> None:
        """Refuse text too long to fit in any tokenization before tokenizing it: no token
        covers more than `max_token_bytes` bytes, so this many bytes need more tokens than
        the limit allows."""
        limit = self.prompt_limit(scoring_only)
        size = len(text.encode("utf-8"))
        if size > limit * self.max_token_bytes:
            raise APIError(400, f"{param}: {size:,} bytes of text are at least "
                           f"{-(-size // self.max_token_bytes):,} tokens, more than the "
                           f"{limit} allowed", param=param, code="context_length_exceeded")

    def engine_params(self, sampling: Sampling, prompt_len: int, sample: int,
                      logprobs: int | None) -> SamplingParams:
        """Engine settings of one choice: max_tokens clipped to the slot's room; the n
        samples of a seeded request get seeds seed, seed+1, ..."""
        room = self.capacity - prompt_len + 1
        wanted = sampling.max_tokens if sampling.max_tokens is not None else room
        seed = None if sampling.seed is None else (sampling.seed + sample) % 2**63
        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=max(1, min(wanted, room)), seed=seed, stop=sampling.stop,
            ignore_eos=sampling.ignore_eos, logprobs=logprobs)
        try:
            self.engine.check_params(params)
        except ValueError as err:  # e.g. temperature > 0 with a speculative engine
            name = str(err).split("=", 1)[0]
            raise bad(name, str(err)) from None
        return params

    def token_text(self, token: int) -> str:
        return decode_known(self.tokenizer, [token])


# ---- the app -----------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, served_model: str, max_queue: int = 64,
               chat_encoding: str = "v4", limits: ServerLimits | None = None
               ) -> FastAPI:
    """The FastAPI app serving `engine` (whose cache sets the batch and memory budget);
    chat prompts are rendered with `chat_encoding` (one of `dsv4.text.chat.ENCODINGS`)."""
    if engine.tokenizer is None:
        engine.tokenizer = KnownTokens(tokenizer)  # the engine's stop strings need one
    server = Server(engine, tokenizer, served_model, max_queue, chat_encoding, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="dsv4", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(ReleaseMemoryAfterLargeRequests)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.scheduler.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine thread stopped",
                             "model": server.served_model, **server.scheduler.stats()},
                            status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": server.served_model, "object": "model", "created": server.created,
            "owned_by": "dsv4", "max_model_len": server.capacity}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(server, request, serve_completion, parse_completion_request,
                            server.served_model, server.vocab_size)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(server, request, serve_chat, parse_chat_request,
                            server.served_model)

    return app


async def handle(server: Server, request: Request, serve, parse, *args: Any):
    """Read the body (size- and time-limited), parse it as JSON (well-formed Unicode, bounded
    nesting) and validate it with `parse(body, *args)` off the event loop (a body of millions
    of token ids takes a while to check; `/health` must answer meanwhile), then `serve` it.
    After a large body, the memory it took is given back to the system."""
    try:
        raw = await read_body(request, server.limits)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    except APIError:  # 413 / 408: up to --max-body-bytes were read before the refusal
        request.scope[RELEASE_MEMORY] = True
        raise
    if len(raw) > LARGE_BODY_BYTES:
        request.scope[RELEASE_MEMORY] = True
    parsed = await asyncio.to_thread(lambda: parse(parse_json(raw, server.limits), *args))
    if getattr(parsed, "echo", False) and getattr(parsed, "logprobs", None) is not None:
        request.scope[RELEASE_MEMORY] = True  # prompt scoring: per-token lists of any length
    return await serve(server, request, parsed)


RELEASE_MEMORY = "dsv4.release_memory"


class ReleaseMemoryAfterLargeRequests:
    """ASGI middleware: once the response of a request marked large is sent (its body parsed,
    its prompt tokenized and scored, its JSON answer encoded), give the memory it freed back
    to the system, so the server's resident size returns to where it was."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope.get(RELEASE_MEMORY):
                await asyncio.to_thread(release_free_memory)


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token id decodes to (special tokens included)."""
    return max(len(decode_known(tokenizer, [i]).encode("utf-8"))
               for i in range(tokenizer.vocab_size))


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error body, never FastAPI's default shapes."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, f"{param}: {first.get('msg', 'invalid request')}",
                                     param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        message = (f"{request.method} {request.url.path}: {err.detail}")
        return JSONResponse(APIError(err.status_code, message, type=kind).body(),
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {err}", type="server_error").body(),
                            status_code=500)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def next_item(handle: Handle, request: Request) -> tuple:
    """The next item the scheduler delivered; ClientGone if the client left meanwhile
    (checked every DISCONNECT_POLL_S, also while items keep coming: a non-streaming request
    sends nothing that could fail); APIError items are raised."""
    while True:
        now = time.monotonic()
        if now - handle.checked_at > DISCONNECT_POLL_S:
            handle.checked_at = now
            if await request.is_disconnected():
                raise ClientGone
        if not handle.queue.empty():  # the usual case mid-generation: no timer, no task
            item = handle.queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(handle.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
        if item[0] == "error":
            raise item[2]
        return item


@contextlib.asynccontextmanager
async def generations(server: Server, request: Request, prompts: list[list[int]],
                      params: list[SamplingParams]):
    """Submit generations (429 when full); whatever happens after, unfinished ones are
    cancelled and their cache slots freed (client gone, error, server shutting down)."""
    handle = server.scheduler.new_handle()
    if prompts:
        server.scheduler.submit(handle, prompts, params)
    done = [False]
    try:
        yield handle, done
    finally:
        if prompts and not done[0]:
            server.scheduler.cancel(handle)


# ---- /v1/completions -----------------------------------------------------------------------
class CompletionJob:
    """A parsed /v1/completions request turned into token ids, one choice per (prompt, sample)."""

    def __init__(self, server: Server, parsed: CompletionRequest) -> None:
        self.server, self.parsed = server, parsed
        tok = server.tokenizer
        self.ids: list[list[int]] = []  # per prompt
        self.added: list[int] = []  # per prompt: tokens the server put in front (BOS)
        self.echo_text: list[str] = []
        scoring_only = parsed.sampling.max_tokens == 0
        if not scoring_only:  # before tokenizing what could never be admitted anyway
            server.scheduler.check_admissible(len(parsed.prompts) * parsed.sampling.n)
        for i, prompt in enumerate(parsed.prompts):
            param = "prompt" if len(parsed.prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                server.check_text_size(prompt, param, scoring_only)
                bos = [tok.bos_id] if tok.bos_id is not None else []
                ids = bos + tok.encode(prompt)
                self.added.append(len(bos))
                self.echo_text.append(prompt)
            else:
                ids = list(prompt)
                server.check_prompt(ids, param, scoring_only)  # before decoding all of it
                self.added.append(0)
                self.echo_text.append(decode_known(tok, ids))
            server.check_prompt(ids, param, scoring_only)
            self.ids.append(ids)
        n = parsed.sampling.n
        self.choice_prompt = [p for p in range(len(self.ids)) for _ in range(n)]
        self.engine_prompts = [] if scoring_only else [self.ids[p] for p in self.choice_prompt]
        self.engine_params = [] if scoring_only else [
            server.engine_params(parsed.sampling, len(self.ids[p]), k % n, parsed.logprobs)
            for k, p in enumerate(self.choice_prompt)]
        self.choices = [TextChoice(tok, parsed.sampling.stop) for _ in self.choice_prompt]
        if scoring_only:  # nothing to generate: every choice is complete already
            for choice in self.choices:
                choice.finish_reason = "length"
        self.prompt_logprobs: list[dict | None] = [None] * len(self.ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.parsed.echo and self.parsed.logprobs is not None

    def prompt_tokens(self) -> int:
        return sum(len(self.ids[p]) for p in self.choice_prompt)

    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def legacy_prompt_logprobs(self, p: int, scores: list) -> dict:
        """OpenAI legacy logprobs of prompt p's tokens from a scoring pass (linear in the
        prompt's length: offsets from incremental detokenization)."""
        ids, added = self.ids[p], self.added[p]
        tokens = self._token_strings(ids)
        offsets = [0] * added + token_offsets(self.server.tokenizer, ids[added:])
        top = [None if s is None else self._top(s[1]) for s in scores]
        return {"tokens": tokens, "token_logprobs": [None if s is None else s[0] for s in scores],
                "top_logprobs": top, "text_offset": offsets}

    def legacy_generated_logprobs(self, choice: TextChoice, base: int, start: int = 0) -> dict:
        """OpenAI legacy logprobs of a choice's generated tokens [start:], offsets from
        `base` (the length of the echoed prompt), only tokens inside the visible text. Each
        token's offset was recorded as it arrived: a streamed chunk costs its own tokens."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k in range(start, len(choice.logprobs)):
            token, offset = choice.tokens[k], choice.offsets[k]
            if offset > len(choice.text) or (k and offset == len(choice.text)
                                             and choice.stopped):
                continue
            logprob, top = choice.logprobs[k]
            out["tokens"].append(self.server.token_text(token))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(self._top(top))
            out["text_offset"].append(base + offset)
        return out

    def _token_strings(self, ids: list[int]) -> list[str]:
        return [self.server.token_text(t) for t in ids]

    def _top(self, pairs: list[tuple[int, float]]) -> dict[str, float]:
        top: dict[str, float] = {}
        for token, logprob in pairs:
            top.setdefault(self.server.token_text(token), logprob)
        return top


async def start_stream(server: Server, request: Request, job, stream) -> StreamingResponse:
    """Submit the job's prompts, then stream `stream(...)`'s events. Submitted here, before the
    response starts, so a full queue is still a plain 429."""
    stack = contextlib.AsyncExitStack()
    handle, done = await stack.enter_async_context(
        generations(server, request, job.engine_prompts, job.engine_params))
    return StreamingResponse(stream(server, request, job, handle, done, stack),
                             media_type="text/event-stream")


async def serve_completion(server: Server, request: Request, parsed: CompletionRequest):
    job = await asyncio.to_thread(CompletionJob, server, parsed)  # tokenizing: off the loop
    if parsed.stream:
        return await start_stream(server, request, job, stream_completion)
    async with generations(server, request, job.engine_prompts, job.engine_params) as (handle,
                                                                                     done):
        try:
            await score_prompts(server, request, job)
            await collect(job.choices, handle, request, lambda k, event: job.choices[k].add(event))
            done[0] = True
        except ClientGone:
            return JSONResponse({}, status_code=499)
    return completion_response(job)


async def score_prompts(server: Server, request: Request, job: CompletionJob) -> None:
    """Echo with logprobs: the prompt tokens' log-probabilities, from a scoring pass."""
    if not job.wants_prompt_logprobs:
        return
    for p, ids in enumerate(job.ids):
        handle = server.scheduler.new_handle()
        server.scheduler.score(handle, ids, job.parsed.logprobs or 0)
        try:
            _, _, scores = await next_item(handle, request)
        except ClientGone:
            server.scheduler.cancel(handle)  # stops the scoring at its next chunk
            raise
        job.prompt_logprobs[p] = await asyncio.to_thread(job.legacy_prompt_logprobs, p, scores)


async def collect(choices: list, handle: Handle, request: Request, add) -> None:
    """Feed every delivered event to `add(choice index, event)` until all choices finish."""
    while not all(c.finished for c in choices):
        choice, event = await next_item(handle, request)
        add(choice, event)


def completion_response(job: CompletionJob) -> dict:
    parsed, choices = job.parsed, []
    for k, (choice, p) in enumerate(zip(job.choices, job.choice_prompt)):
        echo = job.echo_text[p] if parsed.echo else ""
        logprobs = None
        if parsed.logprobs is not None:
            logprobs = merge_logprobs(job.prompt_logprobs[p] if parsed.echo else None,
                                      job.legacy_generated_logprobs(choice, len(echo)))
        choices.append({"index": k, "text": echo + choice.text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason or "length"})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": job.server.served_model, "choices": choices,
            "usage": usage(job.prompt_tokens(), job.completion_tokens())}


def merge_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in first}


def stream_end(server: Server, job, obj: str, rid: str, created: int) -> list[str]:
    """The last events of a stream: a usage chunk when the request asked for one, then [DONE]."""
    end = [sse("[DONE]")]
    if job.parsed.include_usage:
        end.insert(0, sse({"id": rid, "object": obj, "created": created,
                           "model": server.served_model, "choices": [],
                           "usage": usage(job.prompt_tokens(), job.completion_tokens())}))
    return end


async def stream_completion(server: Server, request: Request, job: CompletionJob,
                            handle: Handle, done: list, stack: contextlib.AsyncExitStack
                            ) -> AsyncIterator[str]:
    rid, created, parsed = new_id("cmpl"), int(time.time()), job.parsed

    def chunk(index: int, text: str, finish: str | None = None, logprobs=None) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created,
                    "model": server.served_model, "choices": [{
                        "index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": finish}]})

    async with stack:
        try:
            await score_prompts(server, request, job)
            if parsed.echo:
                for k, p in enumerate(job.choice_prompt):
                    yield chunk(k, job.echo_text[p], logprobs=job.prompt_logprobs[p])
            if not job.engine_prompts:  # scoring only
                for k in range(len(job.choices)):
                    yield chunk(k, "", "length")
            while not all(c.finished for c in job.choices):
                k, event = await next_item(handle, request)
                choice = job.choices[k]
                seen = len(choice.logprobs)
                text = choice.add(event)
                logprobs = None
                if parsed.logprobs is not None and len(choice.logprobs) > seen:
                    base = len(job.echo_text[job.choice_prompt[k]]) if parsed.echo else 0
                    logprobs = job.legacy_generated_logprobs(choice, base, start=seen)
                if text or logprobs or choice.finished:
                    yield chunk(k, text, choice.finish_reason, logprobs)
            done[0] = True
            for line in stream_end(server, job, "text_completion", rid, created):
                yield line
        except ClientGone:
            return
        except APIError as err:
            yield sse(err.body())
            yield sse("[DONE]")


# ---- /v1/chat/completions -----------------------------------------------------------------
def verbatim_text(messages: list[dict]) -> str:
    """The message text that the chat prompt holds verbatim (contents and reasoning): a lower
    bound of the prompt's size, known before encoding it."""
    pieces = []
    for message in messages:
        for key in ("content", "reasoning_content"):
            value = message.get(key)
            if isinstance(value, str):
                pieces.append(value)
            elif isinstance(value, list):
                pieces += [part["text"] for part in value
                           if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return "".join(pieces)


class ChatJob:
    """A parsed chat request encoded with the V4 chat template, one choice per sample."""

    def __init__(self, server: Server, parsed: ChatRequest) -> None:
        self.server, self.parsed = server, parsed
        server.check_text_size(verbatim_text(parsed.messages), "messages")
        try:
            # Built from pieces: text from the request never becomes a control token.
            self.ids = encode_chat_ids(
                server.tokenizer, parsed.messages, thinking=parsed.thinking,
                reasoning_effort=parsed.effort, tools=parsed.tools,
                response_format=parsed.response_format, encoding=server.chat_encoding)
        except ValueError as err:
            param = next((p for p in ("tools", "response_format", "reasoning_effort")
                          if str(err).startswith(p)), "messages")
            raise bad(param, str(err).removeprefix(f"{param}: ")) from None
        server.check_prompt(self.ids, "messages")
        n = parsed.sampling.n
        self.engine_prompts = [self.ids] * n
        self.engine_params = [server.engine_params(parsed.sampling, len(self.ids), k,
                                                   parsed.logprobs) for k in range(n)]
        self.choices = [ChatChoice(server.tokenizer, parsed.sampling.stop, parsed.thinking,
                                   call_id_prefix=f"call_{uuid.uuid4().hex[:8]}_{k}_")
                        for k in range(n)]
        self.logprobs_sent = [0] * n

    def prompt_tokens(self) -> int:
        return len(self.ids) * len(self.choices)

    def completion_tokens(self) -> int:
        return sum(len(c.text.tokens) for c in self.choices)

    def token_logprobs(self, k: int, start: int = 0) -> list[dict]:
        """OpenAI chat logprobs entries of choice k's tokens [start:] (all generated tokens,
        reasoning and markup included: they are what the model produced)."""
        choice = self.choices[k].text
        out = []
        for token, (logprob, top) in zip(choice.tokens[start:], choice.logprobs[start:]):
            out.append({**self._entry(token, logprob),
                        "top_logprobs": [self._entry(t, lp) for t, lp in top]})
        return out

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.server.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


async def serve_chat(server: Server, request: Request, parsed: ChatRequest):
    job = await asyncio.to_thread(ChatJob, server, parsed)  # encoding, tokenizing: off the loop
    if parsed.stream:
        return await start_stream(server, request, job, stream_chat)
    async with generations(server, request, job.engine_prompts, job.engine_params) as (handle,
                                                                                     done):
        try:
            await collect(job.choices, handle, request, lambda k, event: job.choices[k].add(event))
            done[0] = True
        except ClientGone:
            return JSONResponse({}, status_code=499)
    choices = []
    for k, choice in enumerate(job.choices):
        logprobs = {"content": job.token_logprobs(k)} if parsed.logprobs is not None else None
        choices.append({"index": k, "message": choice.message(), "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                        **({"problems": choice.problems} if choice.problems else {})})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": server.served_model, "choices": choices,
            "usage": usage(job.prompt_tokens(), job.completion_tokens())}


async def stream_chat(server: Server, request: Request, job: ChatJob, handle: Handle,
                      done: list, stack: contextlib.AsyncExitStack) -> AsyncIterator[str]:
    rid, created, parsed = new_id("chatcmpl"), int(time.time()), job.parsed

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None,
              problems: list[str] | None = None) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": server.served_model, "choices": [{
                        "index": index, "delta": delta, "logprobs": logprobs,
                        "finish_reason": finish, **({"problems": problems} if problems else {})}]})

    async with stack:
        try:
            for k in range(len(job.choices)):
                yield chunk(k, {"role": "assistant", "content": ""})
            while not all(c.finished for c in job.choices):
                k, event = await next_item(handle, request)
                choice = job.choices[k]
                deltas = choice.add(event)
                for i, delta in enumerate(deltas):
                    logprobs = None
                    if parsed.logprobs is not None and i == 0:
                        logprobs = {"content": job.token_logprobs(k, job.logprobs_sent[k])}
                        job.logprobs_sent[k] = len(choice.text.logprobs)
                    yield chunk(k, delta, logprobs=logprobs)
                if choice.finished:
                    logprobs = None
                    if parsed.logprobs is not None:
                        logprobs = {"content": job.token_logprobs(k, job.logprobs_sent[k])}
                    yield chunk(k, {}, choice.finish_reason, logprobs, choice.problems)
            done[0] = True
            for line in stream_end(server, job, "chat.completion.chunk", rid, created):
                yield line
        except ClientGone:
            return
        except APIError as err:
            yield sse(err.body())
            yield sse("[DONE]")
