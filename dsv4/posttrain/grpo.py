"""GRPO for a domain specialist (V4 report, post-training), with the V3.2 stabilisers.

One step:

    Q prompts x G samples each from the engine (record mode: log-probs, kept sets, routing;
    a prompt is fed once and its cache copied to its G samples: `Engine.add_samples`)
    rewards from the domain's checker; advantages normalized within each prompt's group
    log-probs of the samples under the policy (θ) and the frozen reference, both with the
    rollout's routing replayed (Keep Routing) and renormalized over the rollout's top-k/top-p
    kept set at the sampling temperature (Keep Sampling Mask)
    J = mean_i (1/|o_i|) Σ_t [ min(r Â, clip(r, 1-ε, 1+ε) Â) · M_i - β D̂_KL ]   (maximized)

r = π_θ / π_old with π_old the engine's own log-probs; D̂_KL = (π_θ/π_old)(π_ref/π_θ - log
(π_ref/π_θ) - 1), the unbiased K3 estimator re-weighted by the importance ratio (its gradient is
(π_θ/π_old)(log π_θ - log π_ref) ∇log π_θ, an unbiased KL gradient on π_old's samples); M_i
masks a sequence whose advantage is negative while it has drifted off-policy (mean log(π_old /
π_θ) > δ). The reference is the specialist's SFT checkpoint.

Only the groups whose rewards differ are trained on (a group that all passed or all failed has
zero advantage and would only add to the KL term): at 80-90% accuracy most groups are
uninformative, so this is what makes a large Q affordable.

Defaults (our choice: V4 publishes none, R1's are for a 671B model; the runs behind them are in
docs/LOG.md): Q = 128 prompts x G = 8 samples, 30 steps, temperature 0.7 with no top-k/top-p,
ε = 0.2, β = 0.01, δ = 0.5, AdamW lr 3e-5 with eps 1e-8, two updates per rollout batch.
- Large Q, small lr: the gradient of a few groups is mostly noise, and AdamW moves every
  parameter by about lr whatever the noise.
- fp32 training forwards: the precision the engine sampled in, so r is exactly 1 on the first
  update.
- Temperature 0.7: closer to the greedy answers that are evaluated.
- Think mode for expr: its errors become slips that other samples of a group avoid, which GRPO
  can fix; one-step answers failed with confidence and RL left them flat.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from dsv4.options import option
from dsv4.posttrain.common import (
    MetricsLog,
    PosttrainError,
    make_optimizer,
    policy_logprobs,
    rollout_batch,
    sample_rollouts,
    set_lr,
)
from dsv4.pretrain.optim import warmup_cosine


@dataclass
class GRPOConfig:
    # The help texts are also the commands' --help (dsv4.options).
    steps: int = option(30, "optimizer steps", positive=True, metavar="N")
    prompts_per_step: int = option(128, "prompts per step (Q)", positive=True, metavar="Q")
    group_size: int = option(8, "samples per prompt (G)", positive=True, metavar="G")
    temperature: float = option(0.7, "rollout temperature", positive=True)
    top_k: int = option(0, "rollout top-k, 0 = off")
    top_p: float = option(1.0, "rollout top-p", positive=True)
    # expr's longest reasoning + answer + EOS; longer samples are cut (unrewarded): every
    # decode step of a batch waits for its longest sample
    max_tokens: int = option(24, "tokens per sample", positive=True)
    clip_eps: float = option(0.2, "ratio clip ε", positive=True)
    kl_beta: float = option(0.01, "KL weight β")
    offpolicy_delta: float = option(0.5, "δ of the off-policy sequence mask")
    lr: float = option(3e-5, "peak learning rate", metavar="LR")
    optimizer: str = option("adamw", "muon or adamw", choices=("muon", "adamw"))
    adam_eps: float = option(1e-8, "AdamW's ε")
    warmup_steps: int = option(2, "linear LR warm-up steps")
    minibatches: int = option(2, "updates per rollout batch (each on a slice of the samples)")
    clip: float = option(1.0, "gradient-norm clipping")
    seed: int = option(0, "sampling and data order")
    progress: bool = option(True, "no progress bars")

    def check(self) -> None:
        for name in ("steps", "prompts_per_step", "group_size", "max_tokens", "minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PosttrainError(f"{name}={value!r}: must be a positive integer")
        if self.group_size < 2:
            raise PosttrainError(f"group_size={self.group_size}: GRPO compares samples within "
                                 "a group; use at least 2")
        if not self.temperature > 0:
            raise PosttrainError(f"temperature={self.temperature}: RL samples need a "
                                 "temperature > 0")
        if self.prompts_per_step * self.group_size < self.minibatches:
            raise PosttrainError(f"minibatches={self.minibatches}: more than the "
                                 f"{self.prompts_per_step * self.group_size} samples per step")


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[n_groups, G] rewards -> (R - mean) / (std + eps) within each group (population std;
    a group whose rewards are all equal has zero advantage: no signal, no update)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
              kl_beta: float = 0.01, offpolicy_delta: float = 0.5
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """-J (to minimize) and diagnostics. logp (with gradient), old_logp, ref_logp, mask:
    [N, S] (mask 1 on the sampled tokens); advantages: [N] per sequence."""
    mask = mask.float()
    lengths = mask.sum(-1).clamp_min(1)
    adv = advantages.unsqueeze(-1)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    # Off-policy sequence mask: drop negative-advantage sequences the policy has left.
    drift = ((-log_ratio.detach()) * mask).sum(-1) / lengths
    keep = ~((advantages < 0) & (drift > offpolicy_delta))
    log_ref_ratio = ref_logp - logp
    kl = ratio * (log_ref_ratio.exp() - log_ref_ratio - 1)
    per_token = surrogate * keep.unsqueeze(-1).float() - kl_beta * kl
    objective = ((per_token * mask).sum(-1) / lengths).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = dict(
            kl=float(((kl * mask).sum(-1) / lengths).mean()),
            clip_fraction=float((clipped * mask).sum() / mask.sum().clamp_min(1)),
            masked_sequences=float((~keep).float().mean()),
            ratio_mean=float((ratio * mask).sum() / mask.sum().clamp_min(1)),
        )
    return -objective, stats


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def run_grpo(model, reference, tokenizer, domain, cfg: GRPOConfig,
             out: str | os.PathLike[str] | None = None, desc: str | None = None
             ) -> dict[str, Any]:
    """Improve `model` in place on `domain` by GRPO against the frozen `reference`."""
    from tqdm import tqdm

    from dsv4.inference.engine import SamplingParams
    from dsv4.posttrain.common import check_answer_budget
    from dsv4.tasks import prompt_ids, response_text

    cfg.check()
    device = next(model.parameters()).device
    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            max_tokens=cfg.max_tokens)
    problems = domain.problems(cfg.steps * cfg.prompts_per_step, seed=cfg.seed)
    check_answer_budget(tokenizer, domain, problems, cfg.max_tokens)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, adam_eps=cfg.adam_eps)
    reference.eval().requires_grad_(False)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rng = random.Random(cfg.seed)
    log = MetricsLog(out)
    bar = tqdm(range(cfg.steps), desc=desc or f"grpo {domain.name}", disable=not cfg.progress,
               dynamic_ncols=True)
    for step in bar:
        group = problems[step * cfg.prompts_per_step:(step + 1) * cfg.prompts_per_step]
        prompts = [prompt_ids(tokenizer, p.prompt, domain.thinking) for p in group]
        model.eval()
        rollouts = sample_rollouts(model, prompts, params, n=cfg.group_size,
                                   seed=cfg.seed * 100_003 + step)
        rewards = torch.tensor([
            float(domain.check(group[i // cfg.group_size],
                               response_text(tokenizer, r.generated, domain.thinking)))
            for i, r in enumerate(rollouts)]).view(len(group), cfg.group_size)
        advantages = group_advantages(rewards).flatten()
        set_lr(optimizer, warmup_cosine(step, cfg.warmup_steps, cfg.warmup_steps, cfg.steps,
                                            floor=0.1))
        # A group whose samples all scored the same has zero advantage: it only adds to the KL
        # term, so train on the groups that carry signal (DAPO's dynamic sampling, minus the
        # re-sampling); a step without any is skipped.
        mixed = rewards.std(-1) > 0
        informative = mixed.repeat_interleave(cfg.group_size)
        order = [i for i in range(len(rollouts)) if informative[i]]
        rng.shuffle(order)
        model.train()
        totals: dict[str, float] = {}
        minibatches = min(cfg.minibatches, len(order))
        for part in range(minibatches):
            chosen = order[part::minibatches]
            batch = rollout_batch([rollouts[i] for i in chosen], model.cfg.vocab_size,
                                  pad_id).to(device)
            with torch.no_grad():
                ref_logp = policy_logprobs(reference, batch, cfg.temperature)
            logp = policy_logprobs(model, batch, cfg.temperature)
            loss, stats = grpo_loss(logp, batch.old_logprobs, ref_logp,
                                    advantages[chosen].to(device), batch.mask,
                                    clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta,
                                    offpolicy_delta=cfg.offpolicy_delta)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in dict(loss=float(loss.detach()), **stats).items():
                totals[key] = totals.get(key, 0.0) + value / minibatches
        row = dict(step=step + 1, reward=float(rewards.mean()),
                   mixed_groups=float(mixed.float().mean()),
                   completion_tokens=sum(len(r.completion) for r in rollouts) / len(rollouts),
                   trained_sequences=len(order), lr=optimizer.param_groups[0]["lr"], **totals)
        log.add(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row.get('kl', 0.0):.3f}")
    model.eval()
    rewards = [r["reward"] for r in log.rows]
    head = rewards[: max(1, len(rewards) // 4)]
    tail = rewards[-max(1, len(rewards) // 4):]
    return dict(steps=cfg.steps, reward_first_quarter=sum(head) / len(head),
                reward_last_quarter=sum(tail) / len(tail))
