"""Prompt scoring (`echo` + `max_tokens: 0` + `logprobs`) through the KV cache, a chunk at a time.

A scoring request asks for the log-probability of every prompt token. Run as one full forward,
a long prompt held the engine thread for tens of seconds, took memory growing with its length
squared and could not be stopped once its client left. Here it goes through a one-slot KV
cache of `max_tokens` tokens (allocated once, so its memory is fixed), `chunk` tokens per call
of `advance()`; the scheduler calls it between engine steps, so running generations keep
decoding, and a cancelled request stops at the next chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

Score = tuple[float, list[tuple[int, float]]] | None  # (logprob, top alternatives) per token


@dataclass
class ScoringJob:
    handle: Any  # scheduler.Handle: `cancelled`, `deliver(item)`
    prompt: list[int]
    top: int
    done: int = 0  # prompt tokens fed so far
    scores: list[Score] = field(default_factory=lambda: [None])  # the first token: no context
    last_logits: torch.Tensor | None = None  # [V] predicting prompt[done]


class PromptScorer:
    """Scores prompts one chunk per `advance()` call, one prompt at a time, in order."""

    def __init__(self, engine, max_tokens: int, chunk: int) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.chunk = chunk
        self.jobs: deque[ScoringJob] = deque()
        self.cache = None  # allocated on the engine thread (`start`), once
        self.cancelled = 0

    def start(self) -> None:
        """Allocate the scoring cache now, so the server's memory does not grow later."""
        from dsv4.inference.cache import KVCache

        if self.cache is None:
            self.cache = KVCache(self.engine.model, 1, self.max_tokens)

    def add(self, handle, prompt: list[int], top: int) -> None:
        if len(prompt) > self.max_tokens:  # checked by the app first; a last line of defence
            raise ValueError(f"prompt: {len(prompt)} tokens to score, more than the "
                             f"{self.max_tokens} allowed")
        self.jobs.append(ScoringJob(handle, list(prompt), top))

    def has_work(self) -> bool:
        return bool(self.jobs)

    @torch.inference_mode()
    def advance(self) -> None:
        """Feed the next chunk of the first job; deliver its scores when the prompt is done."""
        from dsv4.inference.engine import forward_step

        if not self.jobs:
            return
        job = self.jobs[0]
        if job.handle.cancelled:  # the client left: stop here, free nothing but the turn
            self.jobs.popleft()
            self.cancelled += 1
            return
        self.start()
        if job.done == 0:
            self.cache.reset(0)
        piece = job.prompt[job.done: job.done + self.chunk]
        ids = torch.tensor([piece], device=self.engine.device)
        logits, _ = forward_step(self.engine.model, self.cache,
                                 torch.zeros(1, dtype=torch.long, device=self.engine.device),
                                 ids, all_logits=True)
        rows = logits[0].float().log_softmax(-1)  # [T, V]: row t predicts piece[t + 1]
        if job.last_logits is not None:  # the previous chunk's last row predicts piece[0]
            job.scores += self._scores(job.last_logits.unsqueeze(0), piece[:1], job.top)
        job.scores += self._scores(rows[:-1], piece[1:], job.top)
        job.last_logits = rows[-1]
        job.done += len(piece)
        if job.done == len(job.prompt):
            self.jobs.popleft()
            job.handle.deliver(("score", 0, job.scores))
            if len(job.prompt) > self.chunk:  # long prompts: return their buffers' memory
                from dsv4.server.limits import release_free_memory

                release_free_memory()

    @staticmethod
    def _scores(logprobs: torch.Tensor, targets: list[int], top: int) -> list[Score]:
        if not targets:
            return []
        index = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
        chosen = logprobs.gather(1, index).squeeze(1).tolist()
        if not top:
            return [(value, []) for value in chosen]
        best = logprobs.topk(top, dim=-1)
        values, indices = best.values.tolist(), best.indices.tolist()
        return [(value, list(zip(indices[i], values[i]))) for i, value in enumerate(chosen)]
