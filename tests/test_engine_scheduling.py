"""Engine scheduling for serving: batched, chunked prefill interleaved with the running decode
batch, and raw-model log-probabilities on the events (OpenAI `logprobs`)."""

from __future__ import annotations

import pytest
import torch

from dsv4.inference.engine import Engine, SamplingParams
from dsv4.model.network import Transformer
from tests.parity_utils import randomize, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize(Transformer(tiny_config()), seed=3).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, p: list[int], params: SamplingParams = GREEDY) -> list[int]:
    """The request served by itself, whole prompt in one chunk."""
    return Engine(model, max_batch=1, capacity=512, prefill_chunk=512).generate([p], params)[0]


def run(engine: Engine) -> tuple[dict[int, list[int]], list[list]]:
    tokens: dict[int, list[int]] = {}
    steps = []
    while engine.has_work():
        events = engine.step()
        steps.append(events)
        for event in events:
            if event.token is not None:
                tokens.setdefault(event.request_id, []).append(event.token)
    return tokens, steps


def test_long_prefill_does_not_stall_the_running_batch(model) -> None:
    """A 300-token prompt fed 64 tokens per step while another request keeps decoding one
    token every step; both produce what they would alone."""
    short, long_ = prompt(5, 1), prompt(300, 2)
    engine = Engine(model, max_batch=2, capacity=512, prefill_chunk=64)
    a = engine.add_request(short, GREEDY)
    first_step = [e.token for e in engine.step() if e.token is not None]
    b = engine.add_request(long_, GREEDY)
    tokens, steps = run(engine)
    tokens[a] = first_step + tokens[a]
    prefill_steps = -(-300 // 64)  # 5: the long prompt's first token comes on the 5th step
    first_b = next(i for i, events in enumerate(steps)
                   if any(e.request_id == b and e.token is not None for e in events))
    assert first_b == prefill_steps - 1
    for events in steps[:first_b]:  # meanwhile a got a token on every step
        assert sum(e.request_id == a and e.token is not None for e in events) == 1
    assert tokens[a] == alone(model, short) and tokens[b] == alone(model, long_)


def test_prompts_admitted_together_are_prefilled_in_shared_forwards(model) -> None:
    """Five prompts of different lengths prefill batched (n = the shortest remainder each
    round) and still decode exactly what each decodes alone."""
    prompts = [prompt(n, 10 + n) for n in (7, 7, 20, 133, 64)]
    engine = Engine(model, max_batch=5, capacity=512, prefill_chunk=32)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    tokens, steps = run(engine)
    assert [tokens[i] for i in ids] == [alone(model, p) for p in prompts]
    # Rounds of 7, 13, 12, 32, 32, 32, 5 tokens: the 133-token prompt starts on step 7.
    first = [next(k for k, ev in enumerate(steps) if any(e.request_id == i for e in ev))
             for i in ids]
    assert first == [0, 0, 1, 6, 3]


def test_cancel_during_prefill_frees_the_slot(model) -> None:
    engine = Engine(model, max_batch=1, capacity=512, prefill_chunk=16)
    rid = engine.add_request(prompt(100, 4), GREEDY)
    engine.step()
    assert engine.cancel(rid) and not engine.has_work()
    assert engine.free_slots == [0] and int(engine.cache.lengths[0]) == 0
    later = prompt(9, 5)
    assert engine.generate([later], GREEDY)[0] == alone(model, later)


def test_event_logprobs_are_the_raw_model_log_probabilities(model) -> None:
    """OpenAI `logprobs`: each token's log-probability under the model itself (before
    temperature and top-k/top-p), and the top alternatives, equal the full forward's."""
    p = prompt(11, 6)
    params = SamplingParams(temperature=1.3, top_k=20, max_tokens=6, seed=1, logprobs=3,
                            ignore_eos=True)
    engine = Engine(model, max_batch=2, capacity=512)
    rid = engine.add_request(p, params)
    events = [e for step in run_events(engine) for e in step if e.request_id == rid]
    sampled = [e for e in events if e.token is not None]
    tokens = [e.token for e in sampled]
    with torch.no_grad():
        logprobs = model(torch.tensor([p + tokens]))[0, len(p) - 1:-1].float().log_softmax(-1)
    for t, event in enumerate(sampled):
        assert event.token_logprob == pytest.approx(float(logprobs[t, tokens[t]]), abs=1e-4)
        best = logprobs[t].topk(3)
        assert [tok for tok, _ in event.top_logprobs] == best.indices.tolist()
        assert [v for _, v in event.top_logprobs] == pytest.approx(best.values.tolist(),
                                                                   abs=1e-4)
    assert all(e.logprob is None for e in sampled)  # record mode's field is untouched
    plain = Engine(model, max_batch=1, capacity=512).generate([p], [SamplingParams(
        temperature=1.3, top_k=20, max_tokens=6, seed=1, ignore_eos=True)])[0]
    assert plain == tokens  # asking for logprobs changes nothing about the sampling


def run_events(engine: Engine) -> list[list]:
    steps = []
    while engine.has_work():
        steps.append(engine.step())
    return steps


@pytest.mark.parametrize("logprobs,message", [(-1, "logprobs=-1"), (21, "logprobs=21"),
                                              (True, "logprobs=True")])
def test_bad_logprobs_name_the_parameter(model, logprobs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(logprobs=logprobs).check()
    with pytest.raises(ValueError, match="logprobs=0: not available with speculative"):
        Engine(tiny_model_with_mtp(), max_batch=1, capacity=64, speculative=True).add_request(
            [3, 4], SamplingParams(temperature=0, logprobs=0))


def tiny_model_with_mtp() -> Transformer:
    return randomize(Transformer(tiny_config(n_mtp_layers=1)), seed=0).eval()


# ---- several samples of one prompt (add_samples): one prefill, copied cache slots ----------
SAMPLED = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=11)


def test_samples_of_one_prompt_equal_separate_requests(model) -> None:
    """n samples fed once equal n requests fed separately (sample i seeded seed + i), in
    tokens, log-probabilities and recorded routing; the prompt goes through the model once."""
    p = prompt(40, 5)
    engine = Engine(model, max_batch=4, capacity=64, prefill_chunk=16, record=True)
    ids = engine.add_samples(p, SAMPLED, n=3)
    fed = []
    handle = model.embed.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape))
    try:
        events = [e for _ in iter(engine.has_work, False) for e in engine.step()]
    finally:
        handle.remove()
    prefill_tokens = sum(shape[0] * shape[1] for shape in fed if shape[1] > 1)
    assert prefill_tokens == len(p)  # one batch row per prefill forward: the leader's
    tokens = {rid: [e.token for e in events if e.request_id == rid and e.token is not None]
              for rid in ids}
    assert len({tuple(t) for t in tokens.values()}) > 1  # independent samples
    for i, rid in enumerate(ids):
        params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=11 + i)
        solo = Engine(model, max_batch=1, capacity=64, prefill_chunk=16, record=True)
        solo.add_request(p, params)
        expected = [e for _ in iter(solo.has_work, False) for e in solo.step()]
        got = [e for e in events if e.request_id == rid]
        assert tokens[rid] == [e.token for e in expected if e.token is not None]
        torch.testing.assert_close(
            torch.tensor([e.logprob for e in got if e.logprob is not None]),
            torch.tensor([e.logprob for e in expected if e.logprob is not None]))
        assert torch.equal(got[-1].routing, expected[-1].routing)


@pytest.mark.parametrize("when", ["queued", "prefilling"])
def test_cancelling_the_sample_that_feeds_the_prompt(model, when) -> None:
    """The next sample takes over feeding the prompt; the rest finish as if alone."""
    p = prompt(40, 6)
    engine = Engine(model, max_batch=3, capacity=64, prefill_chunk=16)
    leader, *others = engine.add_samples(p, SAMPLED, n=3)
    if when == "prefilling":
        assert not [e for e in engine.step() if e.token is not None]  # 16 of 40 tokens in
    assert engine.cancel(leader)
    tokens, _ = run(engine)
    assert leader not in tokens and set(tokens) == set(others)
    for i, rid in enumerate(others, start=1):
        params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=11 + i)
        assert tokens[rid] == alone(model, p, params)


def test_cancelling_a_sample_waiting_for_the_prompt(model) -> None:
    p = prompt(40, 7)
    engine = Engine(model, max_batch=3, capacity=64, prefill_chunk=16, record=True)
    first, second, third = engine.add_samples(p, SAMPLED, n=3)
    assert engine.is_waiting(third) and engine.cancel(third)
    engine.step()  # admitted; the prompt is being fed
    assert engine.cancel(second)
    tokens, _ = run(engine)
    assert set(tokens) == {first} and tokens[first] == alone(model, p, SAMPLED)
    assert not engine.has_work() and len(engine.free_slots) == 3


def test_samples_need_room_side_by_side(model) -> None:
    engine = Engine(model, max_batch=2, capacity=64)
    for n in (0, 3, 1.5):
        with pytest.raises(ValueError, match=f"n={n!r}"):
            engine.add_samples(prompt(4, 8), SAMPLED, n=n)
