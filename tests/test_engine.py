"""The generation engine: greedy equals the uncached reference, sampling controls, stopping,
streaming, bad input, continuous batching and MTP speculative decoding."""

from __future__ import annotations

import pytest
import torch

from dsv4.inference.engine import Engine, SamplingParams, draw_tokens, filter_logits
from dsv4.model.network import Transformer
from dsv4.text.tokenizer import byte_tokenizer
from tests.parity_utils import randomize, tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize(Transformer(tiny_config(n_mtp_layers=1)), seed=11).eval()


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(2, model.cfg.vocab_size, (n,), generator=gen).tolist()
            for n in (3, 130, 61, 9)]


def reference_greedy(model: Transformer, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by re-running the full forward for every token (no cache)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == model.cfg.eos_token_id:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.fixture(scope="module")
def references(model, prompts) -> list[list[int]]:
    return [reference_greedy(model, p, GREEDY.max_tokens) for p in prompts]


def test_greedy_batch_equals_uncached_reference(model, prompts, references) -> None:
    engine = Engine(model, max_batch=3, capacity=256)  # 4 prompts, 3 slots: one waits
    assert engine.generate(prompts, GREEDY) == references
    assert not engine.has_work() and sorted(engine.free_slots) == [0, 1, 2]


def test_stream_yields_the_generate_tokens(model, prompts, references) -> None:
    engine = Engine(model, max_batch=2, capacity=256)
    assert list(engine.stream(prompts[1], GREEDY)) == references[1]
    stream = engine.stream(prompts[0], GREEDY)
    first_two = [next(stream), next(stream)]
    stream.close()  # the consumer leaves early: its slot is freed
    assert first_two == references[0][:2]
    assert not engine.has_work() and len(engine.free_slots) == 2


def test_per_request_sampling_in_one_batch(model, prompts, references) -> None:
    engine = Engine(model, max_batch=4, capacity=256)
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    params = [
        GREEDY,
        sampled,
        SamplingParams(temperature=0.8, top_k=1, max_tokens=24),  # top-1 is greedy
        SamplingParams(temperature=2.0, top_p=1e-6, max_tokens=24),  # nucleus of one token
    ]
    out = engine.generate(prompts, params)
    assert out[0] == references[0]
    assert out[2] == references[2] and out[3] == references[3]
    assert len(out[1]) == 24
    again = engine.generate([prompts[1]], [sampled])[0]
    assert again == out[1]  # same seed, same tokens, whatever else is in the batch
    other = engine.generate([prompts[1]], [SamplingParams(temperature=1.0, seed=8,
                                                          max_tokens=24, ignore_eos=True)])[0]
    assert other != out[1]


def test_top_k_and_top_p_restrict_the_choice(model, prompts) -> None:
    engine = Engine(model, max_batch=1, capacity=256)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]]))[0, -1]
    top3 = set(logits.topk(3).indices.tolist())
    firsts = {engine.generate([prompts[0]], SamplingParams(temperature=5.0, top_k=3, seed=s,
                                                           max_tokens=1))[0][0]
              for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def test_batched_draws_follow_the_filtered_distribution() -> None:
    """draw_tokens: each row drawn from softmax(filtered logits / T) with its own generator;
    the reported log-prob and kept set are those of that distribution."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20_000
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=4),
                   SamplingParams(temperature=1.0, top_p=0.8)):
        generators = [torch.Generator().manual_seed(i) for i in range(rows)]
        draws = draw_tokens(logits.expand(rows, -1), [params] * rows, generators, kept_sets=True)
        expected = filter_logits(logits, params).softmax(-1)
        counts = torch.bincount(torch.tensor([d.token for d in draws]), minlength=6) / rows
        assert torch.allclose(counts, expected, atol=0.015), (params, counts, expected)
        assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
        first = draws[0]
        assert first.logprob == pytest.approx(float(expected[first.token].log()), abs=1e-5)
        kept = None if bool((expected > 0).all()) else (expected > 0).nonzero().squeeze(1)
        assert (first.kept is None) == (kept is None)
        assert kept is None or first.kept.tolist() == kept.tolist()
    again = draw_tokens(logits.expand(3, -1), [SamplingParams(), GREEDY, SamplingParams()],
                        [torch.Generator().manual_seed(i) for i in (5, 0, 5)])
    assert again[1].token == 0 and again[0].token == again[2].token


def test_stop_tokens_stop_strings_and_max_tokens(model, prompts, references) -> None:
    ref = references[1]
    engine = Engine(model, max_batch=2, capacity=256)
    stop_at = ref[5]
    cut = ref.index(stop_at)
    assert engine.generate([prompts[1]], SamplingParams(
        temperature=0, max_tokens=24, stop_token_ids=[stop_at]))[0] == ref[:cut]
    assert engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=4))[0] == \
        ref[:4]
    # Stop strings are matched on the decoded text (a byte-level tokenizer here).
    tok = byte_tokenizer()
    text_engine = Engine(model, max_batch=1, capacity=256, tokenizer=tok)
    target = tok.decode(ref[:7])
    out = text_engine.generate([prompts[1]], SamplingParams(
        temperature=0, max_tokens=24, stop=[target[-2:]]))[0]
    assert target[-2:] in tok.decode(out) and len(out) <= 7


def test_generation_stops_when_the_cache_is_full(model, prompts) -> None:
    engine = Engine(model, max_batch=1, capacity=140)
    out = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=50,
                                                       ignore_eos=True))[0]
    assert len(prompts[1]) + len(out) == 140 + 1  # the last token is returned, never fed
    assert not engine.has_work()


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt 1 is empty"),
    ([5, 999], r"prompt 1: token 1 = 999 is outside the vocabulary \[0, 160\)"),
    ([5, -1], "token 1 = -1"),
    (list(range(2, 100)) * 3, "prompt 1 has 294 tokens; the cache holds 256"),
    ("hello", "prompt 1: must be a list of token ids"),
])
def test_bad_prompts_are_refused_before_any_work(model, prompts, prompt, message) -> None:
    engine = Engine(model, max_batch=2, capacity=256)
    with pytest.raises(ValueError, match=message):
        engine.generate([prompts[0], prompt], GREEDY)
    assert not engine.has_work() and len(engine.free_slots) == 2
    assert engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3))


@pytest.mark.parametrize("params, message", [
    (SamplingParams(temperature=-1), "temperature=-1"),
    (SamplingParams(top_p=1.5), "top_p=1.5"),
    (SamplingParams(top_p=0), "top_p=0"),
    (SamplingParams(top_k=-2), "top_k=-2"),
    (SamplingParams(max_tokens=0), "max_tokens=0"),
    (SamplingParams(stop=["x"]), "stop strings need a tokenizer"),
    (SamplingParams(temperature=float("nan")), "temperature=nan"),
])
def test_bad_sampling_parameters_name_the_parameter(model, prompts, params, message) -> None:
    engine = Engine(model, max_batch=1, capacity=256)
    with pytest.raises(ValueError, match=message):
        engine.generate([prompts[0]], params)


def test_continuous_batching_cancel_frees_the_slot(model, prompts, references) -> None:
    engine = Engine(model, max_batch=2, capacity=256)
    a = engine.add_request(prompts[0], GREEDY)
    b = engine.add_request(prompts[1], GREEDY)
    tokens: dict[int, list[int]] = {a: [], b: []}

    def run(steps: int | None = None) -> None:
        while engine.has_work() and steps != 0:
            for event in engine.step():
                if event.token is not None:
                    tokens.setdefault(event.request_id, []).append(event.token)
            steps = None if steps is None else steps - 1

    run(steps=2)
    assert engine.cancel(a) and not engine.cancel(a)
    assert tokens[a] == references[0][: len(tokens[a])] and len(engine.free_slots) == 1
    c = engine.add_request(prompts[2], GREEDY)  # joins the running batch in the freed slot
    run()
    assert tokens[b] == references[1] and tokens[c] == references[2]


def test_mtp_speculation_matches_plain_greedy(model, prompts, references) -> None:
    engine = Engine(model, max_batch=4, capacity=256, speculative=True)
    assert engine.generate(prompts, GREEDY) == references
    assert engine.drafts_proposed > 0  # random MTP weights: mostly rejected, rolled back
    assert 0.0 <= engine.acceptance_rate < 0.5
    with pytest.raises(ValueError, match="temperature=1.0: speculative decoding is greedy"):
        engine.generate(prompts[:1], SamplingParams(temperature=1.0))


@pytest.mark.parametrize("wrong_every", [0, 3])
def test_speculation_with_accepted_and_rejected_drafts(model, prompts, references,
                                                       wrong_every) -> None:
    """An oracle drafter that knows the greedy answer (and lies every 3rd time): accepted
    drafts advance two tokens per step, rejected ones roll the cache back."""
    answers = {tuple(p): p + r for p, r in zip(prompts, references)}
    calls = [0]

    def draft(tokens: list[int]) -> int:
        calls[0] += 1
        for full in answers.values():
            if full[: len(tokens)] == tokens and len(full) > len(tokens):
                right = full[len(tokens)]
                break
        else:
            right = 5
        wrong = (right + 1) % model.cfg.vocab_size
        return wrong if wrong_every and calls[0] % wrong_every == 0 else right

    engine = Engine(model, max_batch=4, capacity=256, speculative=True, draft_fn=draft)
    assert engine.generate(prompts, GREEDY) == references
    if wrong_every:
        assert 0.4 < engine.acceptance_rate < 0.9
    else:
        assert engine.acceptance_rate > 0.9


def test_record_mode_logprobs_and_routing_match_the_training_forward(model, prompts) -> None:
    """What RL needs: the engine's log-probability of each sampled token (under the top-k/top-p
    filtered, temperature-scaled distribution) equals the full forward's, renormalized over
    the recorded kept set, with the recorded expert routing replayed."""
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=12, seed=3)
    engine = Engine(model, max_batch=2, capacity=256, record=True)
    ids = [engine.add_request(p, params) for p in prompts[:2]]
    events: dict[int, list] = {rid: [] for rid in ids}
    while engine.has_work():
        for event in engine.step():
            events[event.request_id].append(event)
    k = model.cfg.n_activated_experts
    for rid, prompt in zip(ids, prompts):
        sampled = [e for e in events[rid] if e.token is not None or e.stop_token is not None]
        tokens = [e.token if e.token is not None else e.stop_token for e in sampled]
        fed = prompt + tokens[:-1]
        routing = events[rid][-1].routing
        assert routing.shape == (model.cfg.n_layers, len(fed), k)
        with torch.no_grad():
            logits, signals = model(torch.tensor([fed]), signals=True)
            logits = logits[0, len(prompt) - 1:]
            natural = torch.stack([layer.indices for layer in signals.routing])
            assert torch.equal(natural, routing)  # fp32: the rollout routed like the forward
            replayed = model(torch.tensor([fed]), routing=routing.unsqueeze(1))
            replayed = replayed[0, len(prompt) - 1:]
        torch.testing.assert_close(replayed, logits)
        for t, event in enumerate(sampled):
            scaled = logits[t] / params.temperature
            mask = torch.full_like(scaled, float("-inf"))
            mask[event.kept] = 0
            expected = (scaled + mask).log_softmax(-1)[tokens[t]]
            assert event.kept is not None and tokens[t] in event.kept.tolist()
            assert abs(event.logprob - float(expected)) < 1e-4


def test_routing_replay_forces_the_experts(model, prompts) -> None:
    ids = torch.tensor([prompts[2]])
    with torch.no_grad():
        logits, signals = model(ids, signals=True)
        own = torch.stack([layer.indices for layer in signals.routing])
        other = (own + 1) % model.cfg.n_routed_experts  # different experts, still distinct
        forced, signals = model(ids, routing=other.unsqueeze(1), signals=True)
        assert torch.equal(signals.routing[-1].indices, other[-1])
        assert torch.equal(model(ids), logits)  # the replay ended with its forward
    assert not torch.allclose(forced, logits)
    with pytest.raises(ValueError, match="routing of shape"):
        model(ids, routing=own)


def test_record_mode_refuses_speculation(model) -> None:
    with pytest.raises(ValueError, match="record=True"):
        Engine(model, speculative=True, record=True)


@pytest.mark.slow
def test_compiled_decode_greedy_equals_eager() -> None:
    """`Engine(compile=True)`: the decode step traced whole with static shapes (3 requests
    padded to the bucket of 4) gives eager's greedy tokens across CSA and HCA boundaries.
    Equal prompt lengths keep the three in one decode batch: one compile."""
    model = randomize(Transformer(tiny_config(n_layers=2, compress_ratios=[4, 128, 0])),
                      seed=12).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, model.cfg.vocab_size, (125,), generator=gen).tolist()
               for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eager = Engine(model, max_batch=4, capacity=256).generate(prompts, params)
    engine = Engine(model, max_batch=4, capacity=256, compile=True)
    assert engine.generate(prompts, params) == eager
    assert engine.compiled.compiled == {4} and engine.compiled.compile_seconds > 0
    for other in ({"record": True}, {"speculative": True}):
        with pytest.raises(ValueError, match="compile=True compiles plain decoding"):
            Engine(model, compile=True, **other)
