"""Post-training losses against hand or explicit computations, and the RL log-probability
equality: the trainer re-scores engine-sampled sequences exactly as the engine sampled them."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.inference.engine import SamplingParams
from dsv4.model.network import Transformer
from dsv4.posttrain.common import (
    policy_logprobs,
    rollout_batch,
    sample_rollouts,
    sampling_logprobs,
)
from dsv4.posttrain.distill import domain_weights, reverse_kl
from dsv4.posttrain.grpo import group_advantages, grpo_loss
from dsv4.posttrain.sft import IGNORE_INDEX, pack_examples, sft_loss
from tests.parity_utils import randomize, tiny_config


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize(Transformer(tiny_config()), seed=5).eval()


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, model.cfg.vocab_size, (n,), generator=gen).tolist()
            for n in (5, 11, 3, 8)]


# ---- the log-probability equality (Keep Routing + Keep Sampling Mask + temperature) ---------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=10, seed=1),
    SamplingParams(temperature=1.3, max_tokens=10, seed=2),
], ids=["topk-topp-t0.7", "full-vocab-t1.3"])
@pytest.mark.parametrize("n", [1, 3], ids=["one-per-prompt", "groups-sharing-prefill"])
@pytest.mark.slow
def test_trainer_logprobs_equal_the_engines(model, prompts, params, n) -> None:
    rollouts = sample_rollouts(model, prompts, params, max_batch=3, seed=4, n=n)
    assert len(rollouts) == n * len(prompts)
    assert all(r.prompt == p for r, p in zip(rollouts, (p for p in prompts for _ in range(n))))
    assert {len(r.completion) for r in rollouts} != {1}  # real sequences of various lengths
    batch = rollout_batch(rollouts, model.cfg.vocab_size, pad_id=0)
    if params.top_k:  # the filter really removed tokens, so renormalization matters
        assert batch.kept is not None and not bool(batch.kept[batch.mask.bool()].all())
    with torch.no_grad():
        trainer = policy_logprobs(model, batch, params.temperature)
    on = batch.mask.bool()
    torch.testing.assert_close(trainer[on], batch.old_logprobs[on], atol=1e-4, rtol=0)
    # The renormalization and temperature are what make it equal: the plain softmax differs.
    with torch.no_grad():
        plain = model(batch.input_ids, routing=batch.routing).log_softmax(-1).gather(
            -1, batch.targets.unsqueeze(-1)).squeeze(-1)
    assert (plain[on] - batch.old_logprobs[on]).abs().max() > 1e-3


@pytest.mark.slow
def test_routing_replay_changes_the_trainer_forward(model, prompts) -> None:
    """Replay is not a no-op: other experts give other log-probs (so the test above checks
    that the recorded routing is used)."""
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    batch = rollout_batch(sample_rollouts(model, prompts[:2], params), model.cfg.vocab_size, 0)
    shifted = (batch.routing + 1) % model.cfg.n_routed_experts
    with torch.no_grad():
        replayed = policy_logprobs(model, batch, 1.0)
        batch.routing = shifted
        other = policy_logprobs(model, batch, 1.0)
    assert (replayed - other).abs().max() > 1e-4


def test_sampling_logprobs_by_hand() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    kept = torch.tensor([[[True, True, False, True]]])
    got = sampling_logprobs(logits, torch.tensor([[1]]), temperature=0.5, kept=kept)
    z = math.exp(4.0) + math.exp(2.0) + math.exp(-2.0)
    assert got.item() == pytest.approx(2.0 - math.log(z), abs=1e-6)


# ---- GRPO -----------------------------------------------------------------------------------
def test_group_advantages() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4))  # no signal in a uniform group


def test_grpo_loss_by_hand() -> None:
    """Two sequences of 2 and 1 tokens; ε = 0.2, β = 0.1, δ large (mask inactive)."""
    old = torch.log(torch.tensor([[0.5, 0.4], [0.2, 0.9]]))
    new = torch.log(torch.tensor([[0.7, 0.4], [0.1, 0.3]]))  # ratios 1.4, 1.0 | 0.5
    ref = torch.log(torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    logp = new.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_beta=0.1,
                            offpolicy_delta=10.0)

    def k3(p, o, r):  # (π/π_old)(π_ref/π - log(π_ref/π) - 1)
        return p / o * (r / p - math.log(r / p) - 1)

    # seq 1: t0 ratio 1.4, A=1 -> min(1.4, 1.2) = 1.2; t1 ratio 1 -> 1.0
    seq1 = ((1.2 - 0.1 * k3(0.7, 0.5, 0.5)) + (1.0 - 0.1 * k3(0.4, 0.4, 0.2))) / 2
    # seq 2: ratio 0.5, A=-2 -> min(-1.0, 0.8 * -2 = -1.6) = -1.6
    seq2 = -1.6 - 0.1 * k3(0.1, 0.2, 0.2)
    assert loss.item() == pytest.approx(-(seq1 + seq2) / 2, abs=1e-6)
    assert stats["masked_sequences"] == 0
    loss.backward()
    # Clipped tokens pass no policy-gradient: seq1 t0 (ratio above 1+ε with A>0) only has the
    # KL term: d/dlogp of -(-β k3)/(2·2) = β/4 · (π/π_old)(log π - log π_ref).
    expected = 0.1 / 4 * (0.7 / 0.5) * (math.log(0.7) - math.log(0.5))
    assert logp.grad[0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert logp.grad[1, 1].item() == 0  # off the mask


def test_grpo_kl_to_self_is_zero_and_ratio_one_is_the_plain_policy_gradient() -> None:
    logp = torch.log(torch.tensor([[0.3, 0.6, 0.5]])).requires_grad_(True)
    adv = torch.tensor([0.7])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(1, 3),
                            kl_beta=1.0)
    assert stats["kl"] == 0 and stats["ratio_mean"] == 1
    assert loss.item() == pytest.approx(-0.7, abs=1e-7)
    loss.backward()  # d(-A·ratio)/dlogp = -A/|o| per token, KL gradient 0 at π = π_ref
    torch.testing.assert_close(logp.grad, torch.full((1, 3), -0.7 / 3))


def test_offpolicy_sequence_mask() -> None:
    """Â < 0 and mean log(π_old/π_θ) > δ: the sequence's policy term is dropped (KL stays)."""
    old = torch.log(torch.tensor([[0.8, 0.8], [0.8, 0.8], [0.8, 0.8]]))
    new = torch.log(torch.tensor([[0.2, 0.2], [0.2, 0.2], [0.79, 0.79]]))
    adv = torch.tensor([-1.0, 1.0, -1.0])  # drifted & negative | drifted & positive | close
    loss, stats = grpo_loss(new, old, new, adv, torch.ones(3, 2), clip_eps=10.0, kl_beta=0.0,
                            offpolicy_delta=0.5)
    assert stats["masked_sequences"] == pytest.approx(1 / 3)
    expected = (0 + 1.0 * 0.25 + -1.0 * (0.79 / 0.8)) / 3
    assert loss.item() == pytest.approx(-expected, abs=1e-6)


# ---- on-policy distillation ----------------------------------------------------------------
def test_reverse_kl_matches_the_explicit_sum_and_is_zero_to_self() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=gen)
    teacher = torch.randn(2, 3, 7, generator=gen)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                ps, pt = student[b, t].softmax(-1), teacher[b, t].softmax(-1)
                total += sum(float(ps[v] * (ps[v].log() - pt[v].log())) for v in range(7))
                count += 1
    assert reverse_kl(student, teacher, mask).item() == pytest.approx(total / count, abs=1e-5)
    assert reverse_kl(student, student, mask).item() == pytest.approx(0, abs=1e-6)
    # reverse, not forward: KL(s||t) != KL(t||s)
    assert abs(reverse_kl(teacher, student, mask).item() - total / count) > 1e-3


def test_reverse_kl_gradient_flows_to_the_student_only() -> None:
    student = torch.randn(1, 2, 5, requires_grad=True)
    teacher = torch.randn(1, 2, 5, requires_grad=True)
    reverse_kl(student, teacher.detach(), torch.ones(1, 2)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


# ---- SFT ------------------------------------------------------------------------------------
def test_sft_loss_is_the_mean_over_assistant_tokens() -> None:
    logits = torch.randn(1, 4, 6)
    targets = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 5]])
    expected = -(logits[0, 1].log_softmax(-1)[2] + logits[0, 3].log_softmax(-1)[5]) / 2
    assert sft_loss(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)


def test_packed_forward_equals_separate_forwards(model) -> None:
    """Packing never lets examples see each other: per-example logits (and so the SFT loss)
    are those of each example alone, including compressed layers (ratio 4 alignment)."""
    gen = torch.Generator().manual_seed(2)
    examples = []
    for n in (7, 13, 5, 22, 9):
        ids = torch.randint(2, model.cfg.vocab_size, (n,), generator=gen).tolist()
        examples.append((ids, ids[1:] + [IGNORE_INDEX]))
    ids, targets, doc_ids = pack_examples(examples, 40, model.cfg.compress_ratios, pad_id=0)
    assert ids.shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        for example_ids, _ in examples:
            alone = model(torch.tensor([example_ids]))[0]
            # find where the example sits in the packed rows
            hits = [(r, s) for r in range(ids.shape[0]) for s in range(ids.shape[1] - len(
                example_ids) + 1) if ids[r, s:s + len(example_ids)].tolist() == example_ids]
            r, s = hits[0]
            assert s % 4 == 0 or len(example_ids) < 4
            torch.testing.assert_close(packed[r, s:s + len(example_ids)], alone, atol=1e-4,
                                       rtol=1e-4)
    assert int((targets != IGNORE_INDEX).sum()) == sum(len(e[0]) - 1 for e in examples)


def test_domain_weights() -> None:
    assert domain_weights({"a": 0.3, "b": 0.1}, "kl") == pytest.approx({"a": 0.75, "b": 0.25})
    assert domain_weights({"a": 0.3, "b": 0.1}, "equal") == {"a": 0.5, "b": 0.5}
    assert domain_weights({"a": 0.0, "b": 0.0}, "kl") == {"a": 0.5, "b": 0.5}
