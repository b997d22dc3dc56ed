"""Generation with the hybrid KV cache: prefill, batched decode, sampling, MTP speculation.

    engine = Engine(model, max_batch=8)
    outputs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))
    for token in engine.stream([1, 2, 3], SamplingParams(max_tokens=16)): ...

The engine is a loop over `step()`: admit waiting requests into free cache slots, run one
prefill round (the next chunk of every admitted prompt, batched into one forward; a prompt whose
last chunk went in samples its first token), then decode one token for every running request in
one batched forward (or, with `speculative=True`, verify each request's MTP draft: two tokens
per forward, the cache rolled back one token where the draft is rejected). A long prompt thus
takes several steps while the others keep decoding, instead of stalling them. Requests join and
leave between steps (`add_request`, `cancel`), which is what a server's continuous batching
needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from dsv4.inference.cache import KVCache
from dsv4.model.config import is_int, is_number
from dsv4.model.network import Signals, Transformer

DEFAULT_PREFILL_CHUNK = 512
DEFAULT_CAPACITY = 16_384
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """Per-request generation settings. temperature 0 = greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS
    stop: list[str] = field(default_factory=list)  # stop strings (need the engine's tokenizer)
    ignore_eos: bool = False
    # Raw-model log-probabilities on the events (OpenAI `logprobs`): None = off, N = the
    # sampled token's plus the N most likely alternatives.
    logprobs: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range parameter."""
        checks = [
            ("temperature", self.temperature, is_number(self.temperature)
             and math.isfinite(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", self.top_k, is_int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", self.top_p, is_number(self.top_p) and 0 < self.top_p <= 1,
             "a number in (0, 1]"),
            ("max_tokens", self.max_tokens, is_int(self.max_tokens) and self.max_tokens >= 1,
             "an integer >= 1"),
            ("seed", self.seed, self.seed is None or is_int(self.seed), "an integer or None"),
            ("stop_token_ids", self.stop_token_ids,
             all(is_int(t) for t in self.stop_token_ids), "a list of token ids"),
            ("stop", self.stop, all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("logprobs", self.logprobs, self.logprobs is None or (
                is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={value!r}: must be {expected}")


def sample_params(params: SamplingParams, i: int) -> SamplingParams:
    """The settings of sample i of a prompt: a seeded request's samples get seeds seed,
    seed+1, ... (unseeded ones each draw their own)."""
    return params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """fp32 logits [..., V] / temperature, with the tokens top-k and top-p drop set to -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p (keeps >= 1).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@dataclass
class Draw:
    """A sampled token, its log-probability under the distribution it was drawn from
    (temperature, top-k, top-p applied; greedy: the plain log-softmax) and the ids that
    distribution keeps (None: the whole vocabulary, or not asked for)."""

    token: int
    logprob: float
    kept: torch.Tensor | None = None


def draw_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator], kept_sets: bool = False) -> list[Draw]:
    """One token per row of logits [B, V]: row i with params[i] and its own generator.

    Rows that share their settings are filtered as one batch and drawn by inverse CDF, one
    uniform number from each row's generator (per-row torch.multinomial calls were a third
    of the time of sampling RL batches). `kept_sets`: also each filtered row's kept ids.
    """
    logits = logits.float()
    draws: list[Draw | None] = [None] * len(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for rows in groups.values():
        setting = params[rows[0]]
        part = logits[torch.tensor(rows, device=logits.device)]
        if setting.temperature == 0:
            tokens, logp = part.argmax(-1), part.log_softmax(-1)
        else:
            logp = filter_logits(part, setting).log_softmax(-1)
            uniform = torch.stack([torch.rand((), generator=generators[i])
                                   for i in rows]).to(logits.device)
            cdf = logp.exp().cumsum(-1)
            tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), right=True)
            tokens = tokens.squeeze(1).clamp_max(logits.shape[-1] - 1)
        chosen = logp.gather(-1, tokens.unsqueeze(1)).squeeze(1).tolist()
        filtered = kept_sets and setting.temperature != 0 and (setting.top_k or setting.top_p < 1)
        for j, (i, token) in enumerate(zip(rows, tokens.tolist())):
            kept = logp[j].isfinite().nonzero().squeeze(1) if filtered else None
            if kept is not None and len(kept) == logp.shape[-1]:
                kept = None
            draws[i] = Draw(token, chosen[j], kept)
    return draws


def raw_logprobs(logits: torch.Tensor, token: int, top: int
                 ) -> tuple[float, list[tuple[int, float]]]:
    """The model's own log-probability of `token` (before temperature and filters, as OpenAI
    reports it) and the `top` most likely (token, log-probability) pairs."""
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return float(logprobs[token]), pairs


# ---------------------------------------------------------------------------------------------
# The network's forward over the cache
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def forward_step(model: Transformer, cache: KVCache, slots: torch.Tensor,
                 input_ids: torch.Tensor, all_logits: bool = False,
                 collect: Signals | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed T new tokens to each of B slots (each continues from its own length).

    slots: [B] long; input_ids: [B, T]. Returns (logits [B, T or 1, V] fp32 — only the last
    position unless `all_logits` — and the final residual streams [B, T, N, dim]).
    collect: a `Signals` that receives each main layer's routing of the B x T tokens.
    """
    x = model.hidden_streams(input_ids, cache=cache, slots=slots, collect=collect)
    hidden = x if all_logits else x[:, -1:]
    return model.logits(model.collapse(hidden)), x


@torch.inference_mode()
def mtp_step(model: Transformer, cache: KVCache, slots: torch.Tensor, streams: torch.Tensor,
             next_ids: torch.Tensor) -> torch.Tensor:
    """The MTP block over the cache (`Transformer.mtp_hidden`): logits [B, T, V] of the
    tokens two ahead. streams: [B, T, N, dim] main final streams; next_ids: [B, T]."""
    return model.logits(model.mtp_hidden(streams, next_ids, cache=cache, slots=slots))


class CompiledDecode:
    """One decode token for each of B slots through `torch.compile`, captured whole.

    Traced with static shapes (`dsv4.model.network.static_shapes`: the cached forward then reads no
    lengths), with a batch padded up to a bucket (powers of two up to max_batch) by repeating
    its last row: the repeat writes the same rows of the same slot, so it changes nothing. Each
    bucket compiles once, on first use; inductor's on-disk cache makes the next start fast.
    On CUDA, mode "reduce-overhead" replays the step as a CUDA graph.
    """

    def __init__(self, model: Transformer, cache: KVCache, max_batch: int):
        self.model, self.cache = model, cache
        self.buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(self.buckets))
        # On CPU inductor's C++ wrapper measured within noise (+6%) for a longer compile.
        mode = "reduce-overhead" if cache.lengths.device.type == "cuda" else None
        self.step = torch.compile(self.logits, dynamic=False, fullgraph=True, mode=mode)
        self.compiled: set[int] = set()
        self.compile_seconds = 0.0  # first calls of each bucket: tracing and code generation

    def logits(self, slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.hidden_streams(ids, cache=self.cache, slots=slots)
        return self.model.logits(self.model.collapse(x))

    def __call__(self, slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """slots [B], ids [B, 1] -> logits [B, 1, V] fp32."""
        batch = slots.shape[0]
        size = next(b for b in self.buckets if b >= batch)
        if size > batch:
            slots = torch.cat((slots, slots[-1:].expand(size - batch)))
            ids = torch.cat((ids, ids[-1:].expand(size - batch, -1)))
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.step(slots, ids)
        if size not in self.compiled:
            self.compiled.add(size)
            self.compile_seconds += time.perf_counter() - start
        return logits[:batch]


# ---------------------------------------------------------------------------------------------
# Requests and the engine
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One generated sequence. The n samples of one prompt (`Engine.add_samples`) are n
    requests of one `SampleGroup`, which feeds the prompt once for all of them."""

    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    fed: int = 0  # prompt tokens already in the cache (chunked prefill)
    next_token: int | None = None  # sampled, not yet fed to the model
    draft: int | None = None  # MTP guess for the token after next_token
    pending_stream: torch.Tensor | None = None  # streams of the last position MTP has not seen
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    routing: list[torch.Tensor] = field(default_factory=list)  # record mode: [layers, T, k]
    group: SampleGroup | None = None  # until its prompt is in the cache


@dataclass
class SampleGroup:
    """The rows continuing one prompt, admitted together: the first row feeds the prompt into
    its cache slot; when the last chunk is in, the others copy that slot and every row samples
    on its own. A feeding row that is cancelled hands the feeding to the next (from scratch:
    its own slot is still empty)."""

    rows: list[Request]


@dataclass
class Event:
    """One step's news about a request: a new token and/or its end.

    With `Engine(record=True)` (for RL): `logprob` and `kept` describe the sampled token
    (`token`, or `stop_token` when a stop token ended the request; see `Draw`), and
    the finishing event's `routing` [n_layers, L, k] holds the experts every fed position
    (prompt + sampled tokens but the last) was routed to, for routing replay
    (`Transformer.forward`'s `routing`).
    """

    request_id: int
    token: int | None
    finished: bool = False
    finish_reason: str | None = None
    stop_token: int | None = None
    logprob: float | None = None
    kept: torch.Tensor | None = None
    routing: torch.Tensor | None = None
    # SamplingParams.logprobs set: the raw model's log-probability of `token` (or
    # `stop_token`) and the most likely alternatives [(token, logprob)], best first.
    token_logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Engine:
    """Batched generation for a `Transformer` (see the module docstring).

    max_batch: cache slots, i.e. requests decoded together; capacity: tokens per slot (prompt +
    output); tokenizer: needed only for stop strings (anything with `decode(ids) -> str`);
    speculative: self-speculation (greedy requests only) with the MTP block's drafts, or with
    `draft_fn(tokens) -> token` guessing the token after `tokens` (e.g. prompt lookup) when
    given; kv_fp8: FP8 cache storage; record: log-probabilities, kept sets and expert routing
    on the events (see `Event`); prefill_chunk: most prompt tokens one request feeds per step
    (a prefill round feeds at most `4 * prefill_chunk` tokens over all requests); compile: plain
    decode steps through `torch.compile` (`CompiledDecode`; prefill and speculation stay eager).
    """

    def __init__(self, model: Transformer, *, max_batch: int = 8, capacity: int | None = None,
                 tokenizer=None, speculative: bool = False, draft_fn=None,
                 kv_fp8: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, seed: int = 0,
                 record: bool = False, compile: bool = False):
        cfg = model.cfg
        if record and speculative:
            raise ValueError("record=True needs plain decoding (speculative=False)")
        if compile and (record or speculative):
            raise ValueError("compile=True compiles plain decoding: not with record=True or "
                             "speculative=True")
        self.use_mtp = speculative and draft_fn is None
        if self.use_mtp and not len(model.mtp):
            raise ValueError("speculative=True needs a model with an MTP block (n_mtp_layers=0)")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be at least 1")
        self.model = model.eval()
        self.cfg = cfg
        self.device = next(model.parameters()).device
        capacity = capacity or min(cfg.max_seq_len, DEFAULT_CAPACITY)
        self.cache = KVCache(model, max_batch, capacity, kv_fp8=kv_fp8, mtp=self.use_mtp)
        self.tokenizer = tokenizer
        self.speculative = speculative
        self.draft_fn = draft_fn
        self.prefill_chunk = prefill_chunk
        self.record = record
        self.seeds = torch.Generator().manual_seed(seed)
        self.ids = itertools.count()
        self.waiting: deque[SampleGroup] = deque()
        self.running: dict[int, Request] = {}
        self.free_slots = list(range(max_batch))
        self.drafts_proposed = self.drafts_accepted = 0
        self.compiled = CompiledDecode(model, self.cache, max_batch) if compile else None

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def acceptance_rate(self) -> float:
        """Fraction of MTP drafts the main model accepted (speculative mode)."""
        return self.drafts_accepted / max(1, self.drafts_proposed)

    # -- request intake -----------------------------------------------------------------------
    def check_prompt(self, prompt: Sequence[int], where: str = "prompt") -> list[int]:
        """A validated copy of a prompt; ValueError naming what is wrong."""
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise ValueError(f"{where}: must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"{where} is empty: give at least one token")
        for i, token in enumerate(prompt):
            if not is_int(token) or not 0 <= token < self.cfg.vocab_size:
                raise ValueError(f"{where}: token {i} = {token!r} is outside the vocabulary "
                                 f"[0, {self.cfg.vocab_size})")
        if len(prompt) >= self.capacity:
            raise ValueError(f"{where} has {len(prompt)} tokens; the cache holds "
                             f"{self.capacity} per sequence (model context "
                             f"{self.cfg.max_seq_len}), leaving no room to generate")
        return list(prompt)

    def check_params(self, params: SamplingParams) -> SamplingParams:
        params.check()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer=...)")
        if self.speculative and params.temperature != 0:
            raise ValueError(f"temperature={params.temperature}: speculative decoding is greedy "
                             "only (temperature=0)")
        if self.speculative and params.logprobs is not None:
            raise ValueError(f"logprobs={params.logprobs}: not available with speculative "
                             "decoding (it accepts two tokens per forward)")
        return params

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt; returns its request id. Validates everything first."""
        return self.add_samples(prompt, params, 1)[0]

    def add_samples(self, prompt: Sequence[int], params: SamplingParams | None = None,
                    n: int = 1) -> list[int]:
        """Queue `n` independent samples of one prompt; returns their request ids. The prompt
        is fed once: the samples are admitted together and copy its cache slot when its last
        chunk is in, then each draws its own tokens (with `params.seed`, sample i seeds
        `params.seed + i`)."""
        if not is_int(n) or not 1 <= n <= self.cache.slots:
            raise ValueError(f"n={n!r}: must be an integer between 1 and max_batch "
                             f"({self.cache.slots}), the samples run side by side")
        if self.use_mtp and n > 1:
            raise ValueError("add_samples with n > 1 needs plain decoding (the MTP drafts "
                             "keep per-request state)")
        params = params or SamplingParams()
        group = SampleGroup([self.new_request(prompt, sample_params(params, i))
                             for i in range(n)])
        for row in group.rows:
            row.group = group
        self.waiting.append(group)
        return [row.id for row in group.rows]

    def new_request(self, prompt: Sequence[int], params: SamplingParams | None) -> Request:
        params = self.check_params(params or SamplingParams())
        prompt = self.check_prompt(prompt)
        seed = params.seed if params.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=self.seeds))
        return Request(next(self.ids), prompt, params, torch.Generator().manual_seed(seed))

    def cancel(self, request_id: int) -> bool:
        """Stop a request and free its cache slot; False if it is unknown or already done."""
        for group in self.waiting:
            for row in group.rows:
                if row.id == request_id:
                    group.rows.remove(row)
                    if not group.rows:
                        self.waiting.remove(group)
                    return True
        request = self.running.get(request_id)
        if request is None:
            return False
        if request.group is not None:  # its prompt is not in yet
            request.group.rows.remove(request)
        self.finish(request, "cancelled")
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit what fits, run one prefill round, then decode one token (or verify one draft)
        for every request whose prompt is in."""
        events: list[Event] = []
        while self.waiting and len(self.free_slots) >= len(self.waiting[0].rows):
            self.admit(self.waiting.popleft())
        prefilling = [r for r in self.running.values()
                      if r.group is not None and r is r.group.rows[0]]
        if prefilling:
            events += self.prefill_round(prefilling)
        decoding = [r for r in self.running.values()
                    if not r.finished and r.fed == len(r.prompt)]
        if decoding:
            events += self.speculate(decoding) if self.speculative else self.decode(decoding)
        return events

    def admit(self, group: SampleGroup) -> None:
        for row in group.rows:
            row.slot = self.free_slots.pop(0)
            self.cache.reset(row.slot)
            self.running[row.id] = row

    def prefill_round(self, requests: list[Request]) -> list[Event]:
        """The next chunk of every prompt still being fed, in one [B, n] forward. All rows must
        feed the same n tokens (no padding: it would leak into the compressor windows), so n is
        the shortest remainder (at most prefill_chunk); the longer prompts go on next step.
        Prompts whose last token went in sample their first token."""
        n = min(self.prefill_chunk, *(len(r.prompt) - r.fed for r in requests))
        batch = requests[: max(1, 4 * self.prefill_chunk // n)]
        if self.use_mtp:  # the MTP catch-up keeps per-request state: one prompt at a time
            batch = batch[:1]
        slots = torch.tensor([r.slot for r in batch], device=self.device)
        ids = torch.tensor([r.prompt[r.fed : r.fed + n] for r in batch], device=self.device)
        signals = self.new_signals()
        logits, streams = forward_step(self.model, self.cache, slots, ids, collect=signals)
        self.record_routing(batch, n, signals)
        samplers, rows = [], []
        for i, request in enumerate(batch):
            if self.use_mtp:
                self.mtp_catch_up(request, slots[i : i + 1], streams[i : i + 1], ids[i : i + 1])
            request.fed += n
            if request.fed == len(request.prompt):
                for sampler in (request, *self.fork(request)):
                    samplers.append(sampler)
                    rows.append(i)
        return self.sample_next(samplers, logits[rows, -1]) if samplers else []

    def fork(self, feeder: Request) -> list[Request]:
        """The other rows of the feeder's group copy its fed prompt (cache slot and recorded
        routing); the group's work is done."""
        rows = feeder.group.rows
        for row in rows[1:]:
            self.cache.copy_slot(feeder.slot, row.slot)
            row.fed, row.routing = feeder.fed, list(feeder.routing)
        for row in rows:
            row.group = None
        return rows[1:]

    def mtp_catch_up(self, request: Request, slots, streams, ids) -> None:
        """Run MTP over prompt positions whose next token is now known (it lags one token)."""
        if request.pending_stream is not None:
            streams = torch.cat((request.pending_stream, streams), dim=1)
        else:
            ids = ids[:, 1:]
        request.pending_stream = streams[:, -1:]
        if ids.shape[1]:
            mtp_step(self.model, self.cache, slots, streams[:, :-1], ids)

    def decode(self, requests: list[Request]) -> list[Event]:
        slots = torch.tensor([r.slot for r in requests], device=self.device)
        ids = torch.tensor([[r.next_token] for r in requests], device=self.device)
        signals = self.new_signals()
        if self.compiled is not None:  # (never recording: see __init__)
            logits = self.compiled(slots, ids)
        else:
            logits, _ = forward_step(self.model, self.cache, slots, ids, collect=signals)
        self.record_routing(requests, 1, signals)
        return self.sample_next(requests, logits[:, -1])

    def sample_next(self, requests: list[Request], logits: torch.Tensor) -> list[Event]:
        """Each request's next token from its row of logits [B, V], as events."""
        draws = draw_tokens(logits, [r.params for r in requests],
                            [r.generator for r in requests], kept_sets=self.record)
        events = []
        for request, row, draw in zip(requests, logits, draws):
            events += self.emit(request, [draw.token], row, draw)
        return events

    def new_signals(self) -> Signals | None:
        """Record mode asks each forward for its routing; otherwise nothing is collected."""
        return Signals() if self.record else None

    def record_routing(self, requests: list[Request], n_tokens: int,
                       signals: Signals | None) -> None:
        """Record mode: keep the experts each request's newly fed tokens were routed to."""
        if signals is None:
            return
        k = self.cfg.n_activated_experts
        chosen = torch.stack([routing.indices.view(len(requests), n_tokens, k)
                              for routing in signals.routing], dim=1).cpu()  # [B, L, T, k]
        for request, routing in zip(requests, chosen):
            request.routing.append(routing)

    def speculate(self, requests: list[Request]) -> list[Event]:
        """Verify each request's draft with one two-token forward (greedy only).

        The sequence holds L tokens; next_token (position L) and the draft (L+1) go in. If the
        model's choice at L equals the draft, both it and the model's choice at L+1 are kept;
        otherwise only the correction is, and position L+1 is dropped from the cache.
        """
        for request in requests:
            if request.draft is None:
                request.draft = self.first_draft(request)
        slots = torch.tensor([r.slot for r in requests], device=self.device)
        ids = torch.tensor([[r.next_token, r.draft] for r in requests], device=self.device)
        logits, streams = forward_step(self.model, self.cache, slots, ids, all_logits=True)
        predicted = logits.argmax(-1).tolist()  # [B, 2]
        accepted = [p[0] == r.draft for p, r in zip(predicted, requests)]
        # Tokens at L+1 and L+2 (the second is meaningless after a rejection).
        decided = [[r.draft, p[1]] if ok else [p[0], p[0]]
                   for p, r, ok in zip(predicted, requests, accepted)]
        drafts = self.mtp_drafts(slots, streams, decided, accepted) if self.use_mtp else None
        events = []
        for i, request in enumerate(requests):
            self.drafts_proposed += 1
            self.drafts_accepted += accepted[i]
            if not accepted[i]:  # forget position L+1 (the wrong draft): main layers and MTP
                self.cache.truncate(request.slot, int(self.cache.lengths[request.slot]) - 1)
            request.draft = drafts[i] if drafts else None
            events += self.emit(request, decided[i] if accepted[i] else decided[i][:1])
        return events

    def mtp_drafts(self, slots, streams, decided, accepted) -> list[int]:
        """MTP over positions L and L+1 (taking tokens L+1 and L+2): the next drafts."""
        mtp_logits = mtp_step(self.model, self.cache, slots, streams,
                              torch.tensor(decided, device=self.device))
        guesses = mtp_logits.argmax(-1).tolist()  # [B, 2]
        return [g[1] if ok else g[0] for g, ok in zip(guesses, accepted)]

    def first_draft(self, request: Request) -> int:
        if self.use_mtp:
            return self.propose(request)
        draft = self.draft_fn(request.prompt + request.output)
        if not is_int(draft) or not 0 <= draft < self.cfg.vocab_size:
            raise ValueError(f"draft_fn returned {draft!r}, not a token id in "
                             f"[0, {self.cfg.vocab_size})")
        return draft

    def propose(self, request: Request) -> int:
        """First draft after the prompt: MTP at the prompt's last position."""
        slots = torch.tensor([request.slot], device=self.device)
        ids = torch.tensor([[request.next_token]], device=self.device)
        logits = mtp_step(self.model, self.cache, slots, request.pending_stream, ids)
        request.pending_stream = None
        return int(logits[0, -1].argmax())

    # -- output and stopping ------------------------------------------------------------------
    def emit(self, request: Request, tokens: list[int], logits: torch.Tensor | None = None,
             draw: Draw | None = None) -> list[Event]:
        """Append newly decided tokens, stopping at EOS/stop ids, stop strings, max_tokens or a
        full cache; later tokens of the same step are dropped once the request stops.
        `logits` and `draw` (one sampled token): what it was drawn from, for logprobs and
        record mode."""
        events = []
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.add(self.cfg.eos_token_id)
        for token in tokens:
            info = {}
            if self.record:
                info["logprob"], info["kept"] = draw.logprob, draw.kept
            if params.logprobs is not None and logits is not None:
                info["token_logprob"], info["top_logprobs"] = raw_logprobs(
                    logits, token, params.logprobs)
            if token in stop_ids:
                events.append(self.finish(request, "stop", stop_token=token, **info))
                break
            request.output.append(token)
            request.next_token = token
            events.append(Event(request.id, token, **info))
            reason = self.stop_reason(request)
            if reason:
                events.append(self.finish(request, reason))
                break
        return events

    def stop_reason(self, request: Request) -> str | None:
        params = request.params
        if params.stop and self.stop_string_at(request) is not None:
            return "stop"
        if len(request.output) >= params.max_tokens:
            return "length"
        # the next decode feeds next_token (and in speculative mode a draft after it)
        needed = 2 if self.speculative else 1
        if int(self.cache.lengths[request.slot]) + needed > self.capacity:
            return "length"
        return None

    def stop_string_at(self, request: Request) -> int | None:
        """Character index of the first stop string in the decoded output, if any."""
        text = decode_known(self.tokenizer, request.output)
        hits = [text.find(s) for s in request.params.stop if s in text]
        return min(hits) if hits else None

    def finish(self, request: Request, reason: str, **info) -> Event:
        request.finished, request.finish_reason = True, reason
        self.running.pop(request.id, None)
        self.cache.reset(request.slot)
        self.free_slots.append(request.slot)
        self.free_slots.sort()
        if self.record and request.routing:  # (a request cancelled before its prefill has none)
            info["routing"] = torch.cat(request.routing, dim=1)
        return Event(request.id, None, finished=True, finish_reason=reason, **info)

    # -- convenience APIs ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Generated token ids for each prompt (stop tokens excluded). `params` is one
        SamplingParams for all prompts or one per prompt. Every prompt and parameter set is
        checked before any work starts."""
        requests = self.submit(prompts, params)
        outputs: dict[int, list[int]] = {rid: [] for rid in requests}
        while any(rid in self.running or self.is_waiting(rid) for rid in requests):
            for event in self.step():
                if event.token is not None and event.request_id in outputs:
                    outputs[event.request_id].append(event.token)
        return [outputs[rid] for rid in requests]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None
               ) -> Iterator[int]:
        """Yield the tokens of one prompt as they are produced."""
        (rid,) = self.submit([prompt], params)
        try:
            while rid in self.running or self.is_waiting(rid):
                for event in self.step():
                    if event.request_id == rid and event.token is not None:
                        yield event.token
        finally:  # the consumer stopped early: free the slot
            self.cancel(rid)

    def submit(self, prompts, params) -> list[int]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts: must be a list of token-id lists")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self.check_prompt(prompt, f"prompt {i}")
            self.check_params(p)
        return [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]

    def is_waiting(self, request_id: int) -> bool:
        return any(row.id == request_id for group in self.waiting for row in group.rows)



# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenization for streaming: `add(token)` returns the text that became
    final (held back while the output ends inside a multi-byte UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = decode_known(self.tokenizer, self.ids)
        if full.endswith("\ufffd"):  # maybe the first bytes of a character: wait
            return ""
        return self._advance(full)

    def flush(self) -> str:
        return self._advance(decode_known(self.tokenizer, self.ids))

    def _advance(self, full: str) -> str:
        new = full[len(self.text):]
        self.text = full
        return new


def decode_known(tokenizer, ids: list[int]) -> str:
    """Decode ids, showing ids the tokenizer does not have (a random model with a bigger
    vocabulary than the fallback byte tokenizer) as `[id]` instead of failing."""
    size = tokenizer.vocab_size
    parts, run = [], []
    for token in ids:
        if 0 <= token < size:
            run.append(token)
            continue
        if run:
            parts.append(tokenizer.decode(run))
            run = []
        parts.append(f"[{token}]")
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)
