"""Multi-teacher on-policy distillation (V4 report, post-training): one student, one teacher per
domain, the exact full-vocabulary reverse KL on the student's own samples.

One step: for each domain (samples are grouped by teacher, as V4 dispatches them), the student
samples completions of that domain's prompts with the engine; the teacher and the student score
the same sequences; the loss is

    Σ_v π_s(v | x, y_<t) [log π_s(v | x, y_<t) - log π_t(v | x, y_<t)]

at every student-generated position (including the EOS it sampled), averaged over positions,
with gradients through the student's logits only (the teacher runs under no_grad). Not the
single-token estimate log π_s(y_t) - log π_t(y_t) used as an RL advantage, which V4 rejects as
high-variance. The domain weights w_i are each domain's share of the student's current KL
(`domain_weights`; "equal" gives 1/N). The student forward replays the rollout's
routing (the student's experts at sampling time); the teacher routes by itself, as it would
when generating those tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from dsv4.options import option
from dsv4.posttrain.common import (
    MetricsLog,
    PosttrainError,
    make_optimizer,
    rollout_batch,
    sample_rollouts,
    set_lr,
)
from dsv4.pretrain.optim import warmup_cosine
from dsv4.runtime import bf16_autocast


@dataclass
class DistillConfig:
    # The help texts are also the commands' --help (dsv4.options).
    # steps: at nano, 150 kept 86% of the sum specialist, 250 91-95%
    steps: int = option(250, "optimizer steps", positive=True, metavar="N")
    prompts_per_domain: int = option(24, "student samples per domain per step", positive=True,
                                     metavar="N")
    temperature: float = option(1.0, "student sampling temperature (the KL is between the "
                                "models)", positive=True)
    max_tokens: int = option(24, "tokens per sample, as GRPOConfig.max_tokens")
    lr: float = option(1e-4, "peak learning rate", metavar="LR")
    optimizer: str = option("adamw", "muon or adamw", choices=("muon", "adamw"))
    adam_eps: float = option(1e-8, "AdamW's ε, see GRPOConfig")
    warmup_steps: int = option(3, "linear LR warm-up steps")
    clip: float = option(1.0, "gradient-norm clipping")
    # bf16 autocast for the forwards (at nano size on CPU fp32 is faster)
    bf16: bool = option(False, "bf16 autocast for the forwards")
    weighting: str = option("kl", 'w_i per domain: "kl" (share of the current KL) or "equal"',
                            choices=("kl", "equal"))
    seed: int = option(0, "sampling and data order")
    progress: bool = option(True, "no progress bars")

    def check(self) -> None:
        for name in ("steps", "prompts_per_domain", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PosttrainError(f"{name}={value!r}: must be a positive integer")
        if not self.temperature > 0:
            raise PosttrainError(f"temperature={self.temperature}: on-policy samples need a "
                                 "temperature > 0")
        if self.weighting not in ("kl", "equal"):
            raise PosttrainError(f"weighting={self.weighting!r}: must be 'kl' or 'equal'")


def domain_weights(kls: dict[str, float], weighting: str) -> dict[str, float]:
    """The w_i of L = Σ_i w_i KL(π_s || π_Ei), summing to 1. "kl": each domain's share of the
    student's current total KL (the paper sets w_i by the expert's importance; we give the
    most to the domain the student is furthest from, so no domain is left behind); "equal":
    1/N."""
    if weighting == "equal" or sum(kls.values()) <= 0:
        return {name: 1 / len(kls) for name in kls}
    total = sum(kls.values())
    return {name: kl / total for name, kl in kls.items()}


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(π_s || π_t) = Σ_v π_s (log π_s - log π_t), full
    vocabulary. logits [N, S, V]; mask [N, S]."""
    log_s = student_logits.float().log_softmax(-1)
    log_t = teacher_logits.float().log_softmax(-1)
    per_position = (log_s.exp() * (log_s - log_t)).sum(-1)
    mask = mask.float()
    return (per_position * mask).sum() / mask.sum().clamp_min(1)


def run_distill(student, teachers: dict[str, Any], tokenizer, domains: dict[str, Any],
                cfg: DistillConfig, out: str | os.PathLike[str] | None = None
                ) -> dict[str, Any]:
    """Distill every `teachers[name]` into `student` (in place) on `domains[name]`'s
    prompts."""
    from tqdm import tqdm

    from dsv4.inference.engine import SamplingParams
    from dsv4.posttrain.common import check_answer_budget
    from dsv4.tasks import prompt_ids

    cfg.check()
    if not teachers:
        raise PosttrainError("distillation needs at least one teacher")
    missing = sorted(set(teachers) - set(domains))
    if missing:
        raise PosttrainError(f"teacher(s) {missing} have no domain")
    device = next(student.parameters()).device
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    names = sorted(teachers)
    problems = {name: domains[name].problems(cfg.steps * cfg.prompts_per_domain,
                                             seed=cfg.seed + 17) for name in names}
    for name in names:
        check_answer_budget(tokenizer, domains[name], problems[name], cfg.max_tokens)
    for teacher in teachers.values():
        teacher.eval().requires_grad_(False)
    optimizer = make_optimizer(student, cfg.optimizer, cfg.lr, adam_eps=cfg.adam_eps)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    log = MetricsLog(out)
    bar = tqdm(range(cfg.steps), desc="distill", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        set_lr(optimizer, warmup_cosine(step, cfg.warmup_steps, cfg.warmup_steps, cfg.steps,
                                            floor=0.1))
        row: dict[str, Any] = dict(step=step + 1)
        losses = {}
        window = slice(step * cfg.prompts_per_domain, (step + 1) * cfg.prompts_per_domain)
        prompts = [prompt_ids(tokenizer, p.prompt, domains[name].thinking)
                   for name in names for p in problems[name][window]]
        student.eval()  # every domain's samples in one engine batch: decode steps are shared
        rollouts = sample_rollouts(student, prompts, params, seed=cfg.seed * 100_003 + step)
        student.train()
        # One student forward per domain: one over all domains pads every row to the longest
        # (think-mode) sequence and measured 1.3x slower.
        for index, name in enumerate(names):
            own = rollouts[index * cfg.prompts_per_domain:(index + 1) * cfg.prompts_per_domain]
            batch = rollout_batch(own, student.cfg.vocab_size, pad_id).to(device)
            with torch.no_grad(), bf16_autocast(cfg.bf16, device):
                teacher_logits = teachers[name](batch.input_ids)
            with bf16_autocast(cfg.bf16, device):
                student_logits = student(batch.input_ids, routing=batch.routing)
            losses[name] = reverse_kl(student_logits, teacher_logits, batch.mask)
            row[f"kl_{name}"] = float(losses[name].detach())
        weights = domain_weights({name: float(loss.detach()) for name, loss in losses.items()},
                                 cfg.weighting)
        total = sum(weights[name] * loss for name, loss in losses.items())
        total.backward()
        total = float(total.detach())
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row["loss"] = total
        row["kl_mean"] = sum(float(loss.detach()) for loss in losses.values()) / len(losses)
        row["lr"] = optimizer.param_groups[0]["lr"]
        log.add(row)
        bar.set_postfix(kl=f"{row['kl_mean']:.3f}")
    student.eval()
    return dict(steps=cfg.steps, final_kl=log.rows[-1]["kl_mean"] if log.rows else None)
