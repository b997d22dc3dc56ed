"""What the post-training stages share: loading and saving models, the LR schedule, metrics,
and batches of sampled sequences (rollouts) in the shapes the training forward takes."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv4.errors import Error
from dsv4.files import append_line, write_json_atomic
from dsv4.model.network import Transformer
from dsv4.tasks import (
    DEFAULT_MAX_TOKENS,
    THINK_EFFORT,
    Domain,
    Problem,
    generate_responses,
    prompt_ids,
)

METRICS_NAME = "metrics.jsonl"
STAGE_NAME = "posttrain_stage.json"  # written into a stage's run dir when the stage completes


class PosttrainError(Error, ValueError):
    """Bad input or a run that cannot start; the message names the offending value."""


# ---------------------------------------------------------------------------------------------
# Models in and out
# ---------------------------------------------------------------------------------------------


def load_model_and_tokenizer(path: str | os.PathLike[str]) -> tuple[Transformer, Any]:
    """An fp32 model (master weights for training) and the tokenizer saved with it."""
    from dsv4.text.tokenizer import Tokenizer
    from dsv4.weights.checkpoint import CheckpointError, find_tokenizer, load

    try:
        model = load(path, dtype="fp32")
        tokenizer_path = find_tokenizer(path)
    except CheckpointError as err:
        raise PosttrainError(str(err)) from None
    if tokenizer_path is None:
        raise PosttrainError(f"{path}: no tokenizer.json beside the checkpoint (post-training "
                             "needs the tokenizer the model was trained with)")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise PosttrainError(f"{tokenizer_path}: {tokenizer.vocab_size} token ids, more than "
                             f"the model's vocab_size={model.cfg.vocab_size}")
    model.set_indexer_mode("sparse")
    return model, tokenizer


def save_stage(model: Transformer, out: str | os.PathLike[str], tokenizer, step: int,
               summary: dict[str, Any]) -> Path:
    """A finished stage: a native checkpoint in `out/checkpoints/step_N` (tokenizer inside,
    so `dsv4 generate --run out` works), then `out/posttrain_stage.json` last, which marks the
    stage complete (the pipeline skips stages that have it)."""
    from dsv4.weights.checkpoint import save_to_run

    out = Path(out)
    folder = save_to_run(model, out, step, tokenizer=tokenizer)
    tokenizer.save(out / "tokenizer.json")
    model.cfg.save(out / "config.json", dialect="official")
    write_json_atomic(out / STAGE_NAME, summary)
    return folder


def stage_done(out: str | os.PathLike[str]) -> bool:
    return (Path(out) / STAGE_NAME).is_file()


class MetricsLog:
    """metrics.jsonl of a stage: one JSON object per step (the file is started afresh)."""

    def __init__(self, out: str | os.PathLike[str] | None):
        self.path = Path(out) / METRICS_NAME if out is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            append_line(self.path, json.dumps(row))  # whole line or nothing, as pre-training


def make_optimizer(model: Transformer, name: str, lr: float, weight_decay: float = 0.0,
                   adam_eps: float | None = None):
    """pretrain.optim's optimizer (Muon + AdamW, or AdamW). adam_eps replaces AdamW's 1e-20: with
    it, parameters whose gradients are tiny and noisy (RL) move by less than lr."""
    from dsv4.pretrain.optim import build_optimizer

    try:
        optimizer = build_optimizer(model, name, lr=lr, weight_decay=weight_decay)
    except ValueError as err:
        raise PosttrainError(str(err)) from None
    if adam_eps is not None:
        for group in optimizer.param_groups:
            group["eps"] = adam_eps
    return optimizer


def set_lr(optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ---------------------------------------------------------------------------------------------
# Rollouts: sequences the engine sampled, with what RL needs to re-score them exactly
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    prompt: list[int]
    completion: list[int]  # sampled tokens, including the stop token (EOS) that ended it
    logprobs: list[float]  # the engine's log-prob of each completion token (sampling dist.)
    kept: list[torch.Tensor | None]  # per completion token: ids the sampling filter kept
    routing: torch.Tensor  # [n_layers, len(prompt) + len(completion) - 1, k] experts used
    finish_reason: str

    @property
    def generated(self) -> list[int]:
        """The completion without its stop token (what a user sees decoded)."""
        return self.completion[:-1] if self.finish_reason == "stop" else self.completion


def sample_rollouts(model: Transformer, prompts: Sequence[Sequence[int]], params,
                    max_batch: int = 1024, seed: int = 0, n: int = 1) -> list[Rollout]:
    """Sample `n` completions per prompt (prompt-major order; a prompt is fed once for all
    of them) with the engine in record mode (log-probs, kept sets, routing). RL batches of
    short sequences decode fastest all at once (one forward per token position), hence the
    large `max_batch`."""
    from dsv4.inference.engine import Engine

    was_training = model.training
    capacity = max(len(p) for p in prompts) + params.max_tokens + 1
    engine = Engine(model, max_batch=max(n, min(max_batch, n * len(prompts))),
                    capacity=capacity, record=True, seed=seed)
    ids = [rid for p in prompts for rid in engine.add_samples(list(p), params, n)]
    events: dict[int, list] = {rid: [] for rid in ids}
    with torch.no_grad():
        while engine.has_work():
            for event in engine.step():
                events[event.request_id].append(event)
    model.train(was_training)
    return [_rollout(list(p), events[rid])
            for p, rid in zip((p for p in prompts for _ in range(n)), ids)]


def _rollout(prompt: list[int], events: list) -> Rollout:
    sampled = [e for e in events if e.token is not None or e.stop_token is not None]
    tokens = [e.token if e.token is not None else e.stop_token for e in sampled]
    last = events[-1]
    return Rollout(prompt, tokens, [e.logprob for e in sampled], [e.kept for e in sampled],
                   last.routing, last.finish_reason)


@dataclass
class RolloutBatch:
    """Right-padded training inputs for rollouts. Position t predicts targets[:, t]; `mask`
    marks the completion positions (the only ones trained)."""

    input_ids: torch.Tensor  # [B, S] prompt + completion minus its last token
    targets: torch.Tensor  # [B, S] the next token (pad where mask is 0)
    mask: torch.Tensor  # [B, S] float, 1 on completion positions
    old_logprobs: torch.Tensor  # [B, S] the engine's log-probs (0 off the mask)
    kept: torch.Tensor | None  # [B, S, V] bool, the sampling filter's kept set (None: all)
    routing: torch.Tensor  # [n_layers, B, S, k] the rollout's experts (pads: experts 0..k-1)

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) if t is not None else None for t in (
            self.input_ids, self.targets, self.mask, self.old_logprobs, self.kept,
            self.routing)))


def rollout_batch(rollouts: Sequence[Rollout], vocab_size: int, pad_id: int) -> RolloutBatch:
    lengths = [len(r.prompt) + len(r.completion) - 1 for r in rollouts]
    batch, seq = len(rollouts), max(lengths)
    n_layers, _, k = rollouts[0].routing.shape
    input_ids = torch.full((batch, seq), pad_id, dtype=torch.long)
    targets = torch.full((batch, seq), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, seq)
    old = torch.zeros(batch, seq)
    # Pad positions get distinct valid experts; their outputs never reach a trained position.
    routing = torch.arange(k).expand(n_layers, batch, seq, k).clone()
    any_filtered = any(kept is not None for r in rollouts for kept in r.kept)
    kept_mask = torch.ones(batch, seq, vocab_size, dtype=torch.bool) if any_filtered else None
    for i, r in enumerate(rollouts):
        full = r.prompt + r.completion
        n, start = lengths[i], len(r.prompt) - 1  # position `start` predicts completion[0]
        if r.routing.shape[1] != n:
            raise ValueError(f"rollout {i}: routing covers {r.routing.shape[1]} positions, "
                             f"expected {n} (prompt + completion - 1)")
        input_ids[i, :n] = torch.tensor(full[:-1])
        targets[i, :n] = torch.tensor(full[1:])
        mask[i, start:n] = 1
        old[i, start:n] = torch.tensor(r.logprobs)
        routing[:, i, :n] = r.routing
        if kept_mask is not None:
            for t, kept in enumerate(r.kept):
                if kept is not None:
                    kept_mask[i, start + t] = False
                    kept_mask[i, start + t, kept] = True
    return RolloutBatch(input_ids, targets, mask, old, kept_mask, routing)


def sampling_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                      kept: torch.Tensor | None) -> torch.Tensor:
    """log-prob of each target under the distribution the engine sampled from: fp32 logits
    [B, S, V] / temperature, renormalized over the kept set (Keep Sampling Mask). [B, S]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    if kept is not None:
        scaled = scaled.masked_fill(~kept, float("-inf"))
    return scaled.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def policy_logprobs(model: Transformer, batch: RolloutBatch, temperature: float,
                    replay: bool = True) -> torch.Tensor:
    """The model's log-probs of the rollout tokens [B, S] (0 off the mask), routing every
    position to the experts the rollout used (Keep Routing) when `replay`."""
    logits = model(batch.input_ids, routing=batch.routing if replay else None)
    logp = sampling_logprobs(logits, batch.targets, temperature, batch.kept)
    return logp.masked_fill(batch.mask == 0, 0.0)


# ---------------------------------------------------------------------------------------------
# Domain answers (the domains themselves are in dsv4.tasks)
# ---------------------------------------------------------------------------------------------


def check_answer_budget(tokenizer, domain: Domain, problems: list[Problem], max_tokens: int
                        ) -> None:
    """PosttrainError when a problem's reference answer (with its reasoning, in think mode)
    takes more than `max_tokens` tokens: every sample would be cut before the right answer."""
    from dsv4.posttrain.sft import problems_as_chats
    from dsv4.text.chat import encode_chat_ids

    for problem, chat in zip(problems, problems_as_chats(problems)):
        full = encode_chat_ids(tokenizer, chat, thinking=domain.thinking,
                               reasoning_effort=THINK_EFFORT if domain.thinking else None,
                               add_generation_prompt=False)
        needed = len(full) - len(prompt_ids(tokenizer, problem.prompt, domain.thinking)) - 1
        if needed > max_tokens:  # -1: the stop token need not fit
            raise PosttrainError(f"max_tokens={max_tokens}: domain {domain.name!r} has answers "
                                 f"of {needed} tokens (e.g. {problem.prompt!r}); raise it")


def domain_accuracy(model, tokenizer, domain: Domain, problems: list[Problem], *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, batch: int = 512) -> float:
    """Fraction of `problems` whose greedy answer `domain.check` accepts (chat-encoded, the
    V4 encoding, in the domain's mode; generated with dsv4.inference.engine.Engine)."""
    if not problems:
        raise ValueError(f"domain {domain.name!r}: no problems to evaluate")
    check_answer_budget(tokenizer, domain, problems, max_tokens)
    responses = generate_responses(model, tokenizer, [p.prompt for p in problems],
                                   max_tokens=max_tokens, batch=batch, thinking=domain.thinking)
    correct = sum(bool(domain.check(p, r)) for p, r in zip(problems, responses))
    return correct / len(problems)
