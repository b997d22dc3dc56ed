"""`dsv4 eval`: perplexity through the cache equals the full forward, the indexer recorder
equals the full forward's top-k, benchmark files in every format, errors naming file:line,
resuming after an interruption, the tasks suite and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsv4.evaluate import math_answers as math_suite
from dsv4.evaluate import mc, niah, ppl
from dsv4.evaluate.backends import EvalError, LocalBackend
from dsv4.evaluate.formats import FormatError
from dsv4.evaluate.run import EvalOptions, evaluate
from dsv4.evaluate.store import ResultStore, StoreError
from dsv4.model.network import Transformer
from dsv4.text.tokenizer import byte_tokenizer
from tests.parity_utils import randomize, tiny_config

VOCAB = 288  # the byte tokenizer's 272 ids fit


@pytest.fixture(scope="module")
def model() -> Transformer:
    return randomize(Transformer(tiny_config(vocab_size=VOCAB)), seed=3).float().eval()


@pytest.fixture(scope="module")
def backend(model) -> LocalBackend:
    return LocalBackend(model, byte_tokenizer(), "tiny", capacity=1024, batch=4)


def random_ids(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[t] | ids[:t]) for t >= 1 from one full-sequence forward: [len - 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].log_softmax(-1)
    return logits[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


def test_ppl_one_window_equals_full_forward_cross_entropy(model) -> None:
    ids = random_ids(301)  # > 2 x 128 + 3: HCA entries, CSA with more entries than top-k
    pairs = ppl.token_logprobs(model, ids, context=512, stride=256, chunk=100)
    assert [seen for seen, _ in pairs] == list(range(1, 301))
    got = torch.tensor([lp for _, lp in pairs], dtype=torch.float64)
    torch.testing.assert_close(got, full_logprobs(model, ids).double(), atol=1e-4, rtol=1e-4)


def test_sliding_window_equals_explicit_windows(model) -> None:
    ids, context, stride = random_ids(330, seed=1), 140, 50
    pairs = ppl.token_logprobs(model, ids, context=context, stride=stride, chunk=64)
    # Explicit: token t (t >= context) is scored by the window of `context` tokens ending at
    # the first window end >= t + 1 of the sequence context, context + stride, ... (clipped).
    expected, seen, windows = [], [], {}
    for t in range(1, len(ids)):
        if t < context:
            start, end = 0, context
        else:
            end = min(len(ids), context + math.ceil((t + 1 - context) / stride) * stride)
            start = end - context
        if (start, end) not in windows:
            windows[start, end] = full_logprobs(model, ids[start:end])
        expected.append(float(windows[start, end][t - 1 - start]))
        seen.append(t - start)
    assert [s for s, _ in pairs] == seen
    torch.testing.assert_close(torch.tensor([lp for _, lp in pairs], dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    assert min(seen[context - 1:]) >= context - stride


def test_ppl_summary_arithmetic() -> None:
    records = [{"nats": 10.0, "tokens": 4, "bytes": 8, "loss_by_context": {"0": [1.0, 1]}},
               {"nats": 6.0, "tokens": 4, "bytes": 8, "loss_by_context": {"0": [3.0, 1],
                                                                          "2": [4.0, 2]}}]
    s = ppl.summarize(records)
    assert s["nats_per_token"] == 2.0 and s["perplexity"] == pytest.approx(math.exp(2.0))
    assert s["bits_per_byte"] == pytest.approx(16.0 / math.log(2) / 16)
    assert s["loss_by_context"] == [
        {"from_tokens": 1, "to_tokens": 1, "nats_per_token": 2.0, "count": 2},
        {"from_tokens": 4, "to_tokens": 7, "nats_per_token": 2.0, "count": 2}]
    assert list(ppl.windows(10, 10, 5)) == [(0, 10, 1)]
    assert list(ppl.windows(12, 8, 3)) == [(0, 8, 1), (3, 11, 8), (4, 12, 11)]
    with pytest.raises(EvalError, match="--stride 8"):
        list(ppl.windows(12, 8, 8))


def test_ppl_suite_on_text_files(backend, tmp_path) -> None:
    text = "def add(a, b):\n    return a + b\n" * 12
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "héllo wörld\n" * 30}) + "\n")
    opts = EvalOptions(data=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], context=256)
    results = evaluate(backend, "ppl", tmp_path / "out", opts)
    s = results["summary"]
    # byte tokenizer: one token per byte, each scored (BOS in front)
    assert s["documents"] == 2 and s["bytes"] == len(text) + len(("héllo wörld\n" * 30).encode())
    assert s["tokens"] == s["bytes"]
    record = json.loads((tmp_path / "out" / "items.jsonl").read_text().splitlines()[0])
    ids = backend.prompt_ids(text)
    pairs = ppl.token_logprobs(backend.model, ids, 256, 128)
    assert record["nats"] == pytest.approx(-sum(lp for _, lp in pairs), rel=1e-9)
    assert (tmp_path / "out" / "loss_by_context.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["summary"]["bits_per_byte"] == pytest.approx(s["bits_per_byte"])


# ---------------------------------------------------------------------------------------------
# Needle in a haystack and the indexer recorder
# ---------------------------------------------------------------------------------------------


def explicit_topk(model, ids: list[int]) -> dict[int, list[int]]:
    """The full-sequence forward's indexer top-k for the last position, per CSA layer,
    recomputed from the layer's input with `Attention.compressed` (the training path)."""
    inputs = {}
    hooks = [layer.attn.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, args)) for i, layer in
        enumerate(model.layers) if layer.attn.indexer is not None]
    with torch.no_grad():
        model(torch.tensor([ids]))
        out = {}
        for i, (x, positions, *_) in inputs.items():
            attn = model.layers[i].attn
            cos, sin = niah_rope(attn, positions)
            _, _, q_latent = attn.project(x, cos, sin)
            _, mask, _ = attn.compressed(x, q_latent, positions, cos, sin)
            out[i] = mask[0, -1].nonzero().squeeze(1).tolist()
    for h in hooks:
        h.remove()
    return out


def niah_rope(attn, positions):
    from dsv4.model.network import rope_cos_sin

    return rope_cos_sin(attn.inv_freq, positions)


def test_indexer_recorder_equals_full_forward_top_k(model) -> None:
    from dsv4.inference.cache import KVCache

    ids = random_ids(203, seed=5)  # 50 visible CSA entries > top-k 8
    cache = KVCache(model, 1, 256)
    logits, recorder = niah.prefill_recording(model, cache, ids, chunk=64)
    expected = explicit_topk(model, ids)
    assert sorted(recorder.chosen) == sorted(expected) == [1, 3]
    for layer, chosen in recorder.chosen.items():
        assert chosen == expected[layer] and len(chosen) == model.cfg.index_topk
        assert recorder.position[layer] == len(ids) - 1
    assert all(layer.on_select is None for layer in cache.layers)  # recorder removed
    short = niah.prefill_recording(model, cache, ids[:20], chunk=64)[1]  # 5 entries <= top-k
    assert short.chosen == {1: None, 3: None}
    report = niah.indexer_report(recorder, model.cfg.compress_ratios, range(8, 14), 128)
    needle = [2, 3]  # positions 8..13 -> entries 8 // 4 .. 13 // 4
    for layer in ("1", "3"):
        info = report[layer]
        hit = [e for e in needle if e in expected[int(layer)]]
        assert info["needle_entries"] == needle and info["selected"]
        assert info["recall"] == len(hit) / 2 and info["hit"] == bool(hit)
        assert info["chance"] == pytest.approx(8 / 50)


def test_niah_grid_heatmap_and_needle_positions(backend, tmp_path) -> None:
    opts = EvalOptions(lengths=[256, 400], depths=[0.0, 0.5, 1.0], haystack="filler")
    results = evaluate(backend, "niah", tmp_path, opts)
    s = results["summary"]
    assert s["lengths"] == [256, 400] and len(s["accuracy_grid"]) == 3
    assert all(len(row) == 2 for row in s["accuracy_grid"])
    assert set(s["indexer"]["layers"]) == {"1", "3"}
    assert (tmp_path / "niah.png").stat().st_size > 0
    records = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(records) == 6
    tok = backend.tokenizer
    for record in records:
        assert record["prompt_tokens"] <= record["length"]
        item = next(it for it in niah.make_items([record["length"]], [record["depth"]], 1,
                                                 "single"))
        prompt = niah.build_prompt(item, niah.Haystack(niah.FILLER * 200, backend.count_tokens),
                                   "single", 4, backend.count_tokens)
        ids = backend.prompt_ids(prompt.text + prompt.question)
        start, end = record["needle_tokens"]
        assert tok.decode(ids[start:end]) == f"The secret key is {record['answer']}.\n"
        assert record["correct"] == (niah.first_number(record["output"]) == record["answer"])


def test_niah_chat_mode_finds_the_needle_tokens(backend, tmp_path) -> None:
    from dsv4.text.chat import encode_chat

    opts = EvalOptions(lengths=[300], depths=[0.5], haystack="filler", chat=True)
    evaluate(backend, "niah", tmp_path, opts, plots=False)
    record = json.loads((tmp_path / "items.jsonl").read_text())
    item = niah.make_items([300], [0.5], 1, "single")[0]
    prompt = niah.build_prompt(item, niah.Haystack(niah.FILLER * 200, backend.count_tokens),
                               "single", 4, backend.count_tokens)
    text = encode_chat([{"role": "user", "content": prompt.text + "\n" + prompt.chat_question}])
    ids = backend.tokenizer.encode(text)
    start, end = record["needle_tokens"]
    assert record["prompt_tokens"] == len(ids) and ids[0] == backend.tokenizer.bos_id
    assert backend.tokenizer.decode(ids[start:end]) == f"The secret key is {item.answer}.\n"


def test_niah_prompt_depths_and_multikey() -> None:
    tok = byte_tokenizer()
    count = lambda text: len(tok.encode(text))  # noqa: E731
    hay = niah.Haystack("\n".join(f"line {i} of the haystack" for i in range(500)), count)
    items = niah.make_items([2048], [0.0, 0.5, 1.0], 1, "multikey")
    texts = []
    for item in items:
        p = niah.build_prompt(item, hay, "multikey", 3, count)
        needle = p.text[p.needle_chars[0]: p.needle_chars[1]]
        assert needle.startswith("The secret key for ") and item.answer in needle
        assert p.text.count("The secret key for ") == 3 and "What is the secret key for" in \
            p.question and needle.split(" is ")[0].split("for ")[1] in p.question
        assert count(p.text + p.question) + 1 <= 2048
        texts.append(p.needle_chars[0] / len(p.text))
    assert texts[0] == 0 and 0.4 < texts[1] < 0.6 and texts[2] > 0.95
    assert niah.parse_lengths("1K, 2k,300") == [300, 1024, 2048]
    assert niah.parse_depths("0,50%,100") == [0.0, 0.5, 1.0]
    with pytest.raises(EvalError, match="'x1'"):
        niah.parse_lengths("x1")
    with pytest.raises(EvalError, match="150"):
        niah.parse_depths("150")


# ---------------------------------------------------------------------------------------------
# Multiple choice and math files
# ---------------------------------------------------------------------------------------------


QUESTIONS = [("What is 2 + 2?", ["3", "4", "5", "6"], 1),
             ("Which is a color?", ["red", "run", "rain", "ram"], 0),
             ("Capital of France?", ["Rome", "Oslo", "Paris", "Bern"], 2)]


def write_mc_formats(folder) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    rows = [{"question": q, "choices": c, "answer": a, "subject": "misc"} for q, c, a in QUESTIONS]
    files["mmlu"] = folder / "mmlu.jsonl"
    files["mmlu"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["csv"] = folder / "mmlu.csv"  # the original headerless MMLU CSV
    import csv

    with files["csv"].open("w", newline="") as f:
        csv.writer(f).writerows([[q, *c, "ABCD"[a]] for q, c, a in QUESTIONS])
    files["letters"] = folder / "letters.json"  # a JSON array with A/B/C/D columns
    files["letters"].write_text(json.dumps([{"question": q, **dict(zip("ABCD", c)),
                                             "answer": "ABCD"[a]} for q, c, a in QUESTIONS]))
    files["arc"] = folder / "arc.jsonl"  # the original ARC layout, digit labels
    files["arc"].write_text("".join(json.dumps({
        "question": {"stem": q, "choices": [{"label": str(i + 1), "text": t}
                                            for i, t in enumerate(c)]},
        "answerKey": str(a + 1)}) + "\n" for q, c, a in QUESTIONS))
    files["arc_hf"] = folder / "arc.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": q, "choices": {"text": c,
                                                                     "label": list("ABCD")},
                                          "answerKey": "ABCD"[a]} for q, c, a in QUESTIONS]),
                   files["arc_hf"])
    return {k: str(v) for k, v in files.items()}


def test_mc_reads_every_format_to_the_same_items(tmp_path) -> None:
    files = write_mc_formats(tmp_path)
    for name, path in files.items():
        items = mc.load_items(path)
        assert [(it.question, list(it.choices), it.answer) for it in items] == \
            [(q, c, a) for q, c, a in QUESTIONS], name
    arc = mc.load_items(files["arc"])
    assert arc[0].labels == ("1", "2", "3", "4") and arc[0].key == f"{files['arc']}:1"
    assert mc.load_items(files["arc_hf"])[2].key == f"{files['arc_hf']}#row 2"
    item = mc.load_items(files["mmlu"])[0]
    prompt = mc.letter_prompt(item, mc.load_items(files["mmlu"])[1:2])
    assert prompt == ("The following are multiple choice questions (with answers) about misc."
                      "\n\nWhich is a color?\nA. red\nB. run\nC. rain\nD. ram\nAnswer: A\n\n"
                      "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert mc.parse_choice("The answer is (C).", item.labels) == 2
    assert mc.parse_choice("ABC none", item.labels) is None


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q2", "answer": 0}\n',
     ":2: no choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", \n',
     ":2: invalid JSON"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}\n', ":1: answer 'C'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 7}\n', ":1: answer 7"),
    ('{"choices": ["a", "b"], "answer": 0}\n', ':1: no question field ("question"'),
    ('\n\n{"question": "q", "choices": ["a", "b"]}\n', ':3: no answer field'),
    ('["not an object"]', "#row 0: expected a JSON object"),
])
def test_malformed_mc_file_names_file_line_and_field(tmp_path, content, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FormatError) as err:
        mc.load_items(str(path))
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_malformed_math_and_csv_files(tmp_path) -> None:
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2 #### 2"}\n{"question": "x", "answer": '
                    '"no final #### "}\n')
    with pytest.raises(EvalError, match=f"{path}:2: answer .* nothing after '####'"):
        math_suite.load_items(str(path))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("q1,a,b,c,d,A\nq2,a,b,c,A\n")
    with pytest.raises(FormatError, match=f"{bad_csv}:2: 5 columns, expected 6"):
        mc.load_items(str(bad_csv))
    text = tmp_path / "x.txt"
    text.write_text("")
    with pytest.raises(FormatError, match="unknown benchmark file type '.txt'"):
        mc.load_items(str(text))


def test_math_answer_parsing() -> None:
    assert math_suite.reference_answer("She has 3 + 4 = 7 apples.\n#### 1,250") == "1,250"
    assert math_suite.reference_answer("so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert math_suite.predicted_answer("3 * 4 = 12\n#### 12\n\nQuestion") == "12"
    assert math_suite.predicted_answer("The answer is $1,000.") == "$1,000"
    assert math_suite.predicted_answer("first 3 then 4.5 done") == "4.5"
    assert math_suite.predicted_answer("no digits") is None
    assert math_suite.same_answer("$1,000.", "1000") and math_suite.same_answer("2.50", "2.5")
    assert not math_suite.same_answer("7", "1,250") and not math_suite.same_answer(None, "1")
    assert math_suite.same_answer("\\frac{1}{2}", "\\frac{1}{2}")


def test_continuation_logprobs_equal_full_forward(backend, model) -> None:
    context = "Question: which one?\nAnswer:"
    conts = [" A", " bee", " a much longer choice"]
    scores = backend.continuation_logprobs(context, conts)
    for cont, score in zip(conts, scores):
        ids = backend.prompt_ids(context + cont)  # byte tokens: context + cont split exactly
        n = len(cont.encode())
        expected = float(full_logprobs(model, ids)[-n:].double().sum())
        assert score.n_tokens == n and score.logprob == pytest.approx(expected, abs=1e-3)


def test_mc_and_math_suites_local(backend, tmp_path) -> None:
    files = write_mc_formats(tmp_path)
    opts = EvalOptions(data=[files["mmlu"]], shots=1, scoring=["letter", "text", "generate"])
    r = evaluate(backend, "mc", tmp_path / "mc", opts)
    s = r["summary"]
    assert s["items"] == 2 and {"acc", "acc_text", "acc_norm", "em", "chance"} <= set(s)
    records = [json.loads(x) for x in (tmp_path / "mc" / "items.jsonl").read_text().splitlines()]
    for rec, (_, _, answer) in zip(records, QUESTIONS[1:]):
        lps = rec["letter_logprobs"]
        assert rec["letter_correct"] == (max(range(4), key=lps.__getitem__) == answer)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                       "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n"
                           for i in range(4)))
    r = evaluate(backend, "math", tmp_path / "math",
                 EvalOptions(data=[str(gsm)], shots=2, max_tokens=6))
    assert r["summary"]["items"] == 2
    r = evaluate(backend, "math", tmp_path / "math_think",
                 EvalOptions(data=[str(gsm)], shots=1, think="high", max_tokens=6))
    assert r["summary"]["items"] == 3 and r["settings"]["think"] == "high"


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(backend, tmp_path) -> None:
    rows = [{"question": f"Item {i}: pick {'ABCD'[i % 4]}", "choices": ["w", "x", "y", "z"],
             "answer": i % 4} for i in range(9)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = EvalOptions(data=[str(data)], shots=1)
    reference = evaluate(backend, "mc", tmp_path / "whole", opts)

    seen = []

    def stop_after_three(record):
        seen.append(record["key"])
        if len(seen) == 3:
            raise Interrupt

    backend.batch = 2  # items are stored one by one even inside a generation batch
    try:
        with pytest.raises(Interrupt):
            evaluate(backend, "mc", tmp_path / "cut", opts, on_record=stop_after_three)
        assert not (tmp_path / "cut" / "results.json").exists()
        # a torn line, as if the process died while writing the fourth item
        with (tmp_path / "cut" / "items.jsonl").open("a") as f:
            f.write('{"key": "torn')
        again = []
        resumed = evaluate(backend, "mc", tmp_path / "cut", opts, on_record=again.append)
    finally:
        backend.batch = 4
    assert resumed["resumed_items"] == 3 and resumed["computed_now"] == 5
    assert {r["key"] for r in again}.isdisjoint(seen)
    assert resumed["summary"] == reference["summary"]
    whole = (tmp_path / "whole" / "items.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "items.jsonl").read_text().splitlines()
    assert sorted(map(json.loads, whole), key=lambda r: r["key"]) == \
        sorted(map(json.loads, cut), key=lambda r: r["key"])
    # finished: a third run computes nothing, nor does a smaller --limit
    assert evaluate(backend, "mc", tmp_path / "cut", opts)["computed_now"] == 0
    fewer = evaluate(backend, "mc", tmp_path / "cut", EvalOptions(data=[str(data)], shots=1,
                                                                   limit=3))
    assert fewer["computed_now"] == 0 and fewer["summary"]["items"] == 3


def test_store_refuses_other_settings_and_damaged_lines(tmp_path) -> None:
    store = ResultStore(tmp_path, {"suite": "mc", "shots": 5})
    store.add({"key": "a", "x": 1})
    with pytest.raises(StoreError, match="shots: 5 there, 3 now"):
        ResultStore(tmp_path, {"suite": "mc", "shots": 3})
    assert ResultStore(tmp_path, {"suite": "mc", "shots": 3}, fresh=True).records == {}
    path = tmp_path / "items.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(StoreError, match="items.jsonl:2: not a result line"):
        ResultStore(tmp_path, {"suite": "mc", "shots": 3})


# ---------------------------------------------------------------------------------------------
# Tasks (post-training domains)
# ---------------------------------------------------------------------------------------------


def test_tasks_suite_checks_each_reply_like_domain_accuracy(backend, tmp_path) -> None:
    from dsv4 import tasks
    from dsv4.posttrain.common import domain_accuracy

    class Echo(tasks.Domain):
        """Correct when the reply is the first character of the prompt: some are, some not."""

        name = "echo"

        def generate(self, rng):
            word = "".join(rng.choice("abcdef") for _ in range(6))
            return tasks.Problem(word, word[0])

        def check(self, problem, response):
            return response.strip()[:1] == problem.answer

    builtin = "sum"  # answers short enough for max_tokens=4
    domains = {"echo": Echo(), builtin: tasks.DOMAINS[builtin]}
    opts = EvalOptions(n_problems=6, max_tokens=4)
    r = evaluate(backend, "tasks", tmp_path, opts, domains=domains)
    assert r["summary"]["items"] == 12 and set(r["summary"]["by_domain"]) == {builtin, "echo"}
    for name, domain in domains.items():
        expected = domain_accuracy(backend.model, backend.tokenizer, domain,
                                         domain.eval_set(6), max_tokens=4)
        assert r["summary"]["by_domain"][name] == pytest.approx(expected)
    with pytest.raises(EvalError, match="unknown domain 'nope'"):
        evaluate(backend, "tasks", tmp_path / "x", EvalOptions(domains="nope"), domains=domains)


def test_tasks_suite_asks_a_think_domain_in_think_mode(backend, tmp_path) -> None:
    from dsv4 import tasks

    thinker = tasks.FunctionDomain("thinker", lambda rng: tasks.Problem(
        "".join(rng.choice("abcdef") for _ in range(6)), "a"), thinking=True)
    evaluate(backend, "tasks", tmp_path, EvalOptions(n_problems=4, max_tokens=4),
             domains={"thinker": thinker})
    replies = [json.loads(line)["reply"]
               for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    prompts = [p.prompt for p in thinker.eval_set(4)]
    think = tasks.generate_responses(backend.model, backend.tokenizer, prompts, max_tokens=4,
                                     thinking=True)
    plain = tasks.generate_responses(backend.model, backend.tokenizer, prompts, max_tokens=4)
    assert replies == think != plain


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    import dsv4

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    dsv4.save(model, folder, tokenizer=byte_tokenizer())
    return folder


def test_cli_mc_table_and_results(checkpoint, tmp_path, capsys) -> None:
    from dsv4.cli import main

    files = write_mc_formats(tmp_path)
    out = tmp_path / "out"
    code = main(["eval", str(checkpoint), "--suite", "mc", "--data", files["csv"], "--shots",
                 "1", "--out", str(out), "--dtype", "fp32", "--context", "512"])
    printed = capsys.readouterr().out
    assert code == 0 and "accuracy (letter log-likelihood)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "mc" and results["items"] == 2
    code = main(["eval", str(checkpoint), "--suite", "mc", "--data", files["csv"], "--shots",
                 "1", "--out", str(out), "--dtype", "fp32", "--context", "512"])
    assert code == 0 and "2 item(s) resumed" in capsys.readouterr().out


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys) -> None:
    from dsv4.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": 3}\n')
    cases = [
        (["eval", str(checkpoint), "--suite", "mc", "--data", str(bad), "--shots", "0"],
         f"{bad}:2"),
        (["eval", "--suite", "ppl"], "give exactly one model"),
        (["eval", "--endpoint", "http://127.0.0.1:9/v1", "--suite", "ppl"], "needs --model"),
        (["eval", str(tmp_path / "missing"), "--suite", "ppl"], "no such run directory"),
        (["eval", str(checkpoint), "--suite", "math", "--out", str(tmp_path / "m")],
         "needs one benchmark file"),
        (["eval", str(checkpoint), "--suite", "niah", "--lengths", "4K", "--out",
          str(tmp_path / "n")], "--lengths 4096: longer than the model's max_seq_len 4096"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("dsv4 eval: error:") and message in err, (argv, err)
