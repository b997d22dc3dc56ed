"""What the suites ask of a model, for a dsv4 model in this process (`LocalBackend`) and for any
OpenAI-compatible server (`dsv4.evaluate.endpoint.EndpointBackend`).

Both answer the same questions:

* `continuation_logprobs(context, continuations)`: log P(continuation | context) summed over the
  continuation's tokens, per continuation (multiple-choice log-likelihood scoring), and
  `batch_continuation_logprobs` for several contexts at once (an endpoint sends all the
  requests `concurrency` at a time);
* `complete(prompts, max_tokens, stop)`: greedy completions of raw prompts (few-shot prompts);
* `chat(conversations, think, max_tokens)`: greedy replies to OpenAI-format message lists in the
  V4 chat encoding, `think` = "none" (non-think), "high" (think) or "max" (think-max); returns
  `{"content", "reasoning_content"}` per conversation.

Log-likelihoods are in nats. Local prompts start with BOS (a chat prompt's BOS comes from the
encoding), so every text token is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsv4.errors import Error

# "none" or a reasoning effort of think mode (dsv4.text.chat.REASONING_EFFORTS).
THINK_MODES = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


class EvalError(Error, ValueError):
    """A user-facing problem with an evaluation (bad file, missing capability); one line."""


class LogprobsUnavailable(EvalError):
    """The endpoint returns no prompt log-probabilities (the message says what it answered)."""


@dataclass
class ContinuationScore:
    logprob: float  # nats, summed over the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token was the argmax


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the first stop string (a generation may run past it within a token)."""
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else text


def chat_prompt_ids(tokenizer, messages: list[dict], think: str, encoding: str = "v4"
                    ) -> list[int]:
    """The chat prompt's ids, message text tokenized as plain text (no injected markup)."""
    from dsv4.text.chat import encode_chat_ids

    if think not in THINK_MODES:
        raise EvalError(f"think={think!r}: must be one of {', '.join(THINK_MODES)}")
    thinking = think != "none"
    return encode_chat_ids(tokenizer, messages, thinking=thinking,
                           reasoning_effort=think if thinking else None, encoding=encoding)


class LocalBackend:
    """A dsv4 `Transformer` + tokenizer, scored and sampled through the hybrid KV cache.

    capacity: tokens per sequence (prompt + output); batch: sequences generated together.
    """

    kind = "local"
    has_logprobs = True
    logprobs_reason = None

    def __init__(self, model, tokenizer, label: str, *, capacity: int = 8192, batch: int = 8,
                 prefill_chunk: int = 512):
        self.model, self.tokenizer, self.label = model.eval(), tokenizer, label
        self.chat_encoding = "v4"  # dsv4.text.chat.ENCODINGS; set by `dsv4 eval --chat-encoding`
        self.fingerprint: str | None = None  # which weights these are (keys the result store)
        self.capacity = min(capacity, model.cfg.max_seq_len)
        self.batch = batch
        self.prefill_chunk = prefill_chunk
        self._engine = None
        self._scratch = None
        self._score_cache = None
        self.device = next(model.parameters()).device

    # -- tokens ----------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """BOS + the text's tokens (chat prompts carry their BOS string already)."""
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def check_length(self, n: int, what: str) -> None:
        if n > self.capacity:
            raise EvalError(f"{what} has {n} tokens; the context is {self.capacity} (raise "
                            f"--context, at most the model's max_seq_len "
                            f"{self.model.cfg.max_seq_len})")

    # -- log-likelihood --------------------------------------------------------------------
    def scoring_cache(self, slots: int):
        from dsv4.inference.cache import KVCache

        cache = self._score_cache
        if cache is None or cache.slots < slots:
            self._score_cache = cache = KVCache(self.model, max(slots, 4), self.capacity)
        return cache

    def continuation_logprobs(self, context: str, continuations: Sequence[str]
                              ) -> list[ContinuationScore]:
        """The context is prefilled once, its cache copied to one slot per continuation, and
        all continuations are fed together (right-padded: a causal model's scores of the real
        tokens do not depend on what follows them)."""
        import torch

        from dsv4.inference.engine import forward_step

        ctx = self.prompt_ids(context)
        conts = [self.tokenizer.encode(c) for c in continuations]
        empty = [c for c, ids in zip(continuations, conts) if not ids]
        if empty:
            raise EvalError(f"continuation {empty[0]!r} has no tokens")
        longest = max(len(c) for c in conts)
        self.check_length(len(ctx) + longest - 1, "a prompt with its longest continuation")
        n = len(conts)
        cache = self.scoring_cache(n)
        for slot in range(n):
            cache.reset(slot)
        first = torch.tensor([0], device=self.device)
        prompt = torch.tensor([ctx], device=self.device)
        for s in range(0, prompt.shape[1], self.prefill_chunk):
            logits, _ = forward_step(self.model, cache, first, prompt[:, s: s + self.prefill_chunk])
        step_logits = [logits[0, -1].expand(n, -1)]  # [n, V] predicting continuation token 0
        if longest > 1:
            for slot in range(1, n):
                cache.copy_slot(0, slot)
            pad = self.tokenizer.pad_id or 0
            feed = torch.tensor([c[:-1] + [pad] * (longest - len(c)) for c in conts],
                                device=self.device)
            out, _ = forward_step(self.model, cache, torch.arange(n, device=self.device), feed,
                                  all_logits=True)
            step_logits += [out[:, j] for j in range(longest - 1)]
        logprobs = torch.stack(step_logits, dim=1).float().log_softmax(-1)  # [n, longest, V]
        scores = []
        for i, ids in enumerate(conts):
            rows = logprobs[i, : len(ids)]
            target = torch.tensor(ids, device=rows.device)
            picked = rows.gather(1, target.unsqueeze(1)).squeeze(1)
            greedy = bool((rows.argmax(-1) == target).all())
            scores.append(ContinuationScore(float(picked.double().sum()), len(ids), greedy))
        return scores

    def batch_continuation_logprobs(self, requests: Sequence[tuple[str, Sequence[str]]]
                                    ) -> list[list[ContinuationScore]]:
        """`continuation_logprobs` of several (context, continuations) requests."""
        return [self.continuation_logprobs(c, conts) for c, conts in requests]

    # -- generation ------------------------------------------------------------------------
    def scratch_cache(self, capacity: int):
        """A one-slot KVCache for scoring a sequence, grown when a longer one comes."""
        from dsv4.inference.cache import KVCache

        if self._scratch is None or self._scratch.capacity < capacity:
            self._scratch = KVCache(self.model, 1, capacity)
        return self._scratch

    def engine(self):
        from dsv4.inference.engine import Engine

        if self._engine is None or self._engine.cache.slots != self.batch:
            self._engine = Engine(self.model, max_batch=self.batch, capacity=self.capacity,
                                  tokenizer=self.tokenizer,
                                  prefill_chunk=self.prefill_chunk)
        return self._engine

    def generate_ids(self, prompts: Sequence[list[int]], max_tokens: int,
                     stop: Sequence[str] = ()) -> list[str]:
        from dsv4.inference.engine import SamplingParams, decode_known

        for i, ids in enumerate(prompts):
            self.check_length(len(ids) + max_tokens, f"prompt {i} plus --max-tokens {max_tokens}")
        params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=list(stop))
        outputs = self.engine().generate([list(p) for p in prompts], params)
        return [cut_at_stop(decode_known(self.tokenizer, out), stop) for out in outputs]

    def complete(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str] = ()
                 ) -> list[str]:
        return self.generate_ids([self.prompt_ids(p) for p in prompts], max_tokens, stop)

    def chat(self, conversations: Sequence[list[dict]], think: str, max_tokens: int
             ) -> list[dict]:
        from dsv4.text.chat import parse_completion

        prompts = [chat_prompt_ids(self.tokenizer, m, think, self.chat_encoding)
                   for m in conversations]
        texts = self.generate_ids(prompts, max_tokens)
        replies = []
        for text in texts:
            message = parse_completion(text, thinking=think != "none")
            replies.append({"content": message["content"],
                            "reasoning_content": message.get("reasoning_content")})
        return replies
