"""One suite, end to end: items -> resumable per-item results -> summary -> results.json.

    from dsv4.evaluate.run import EvalOptions, evaluate
    results = evaluate(backend, "ppl", "eval/nano/ppl", EvalOptions(limit=4))

Items are computed `batch` at a time (generation batches, endpoint concurrency) and each
finished item is appended to `out_dir/items.jsonl` at once (see `store.py`), so a rerun after a
crash computes only the rest; the summary is always recomputed from all item records, in item
order, so a resumed run's results equal an uninterrupted one's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsv4.evaluate import mc as mc_suite
from dsv4.evaluate import niah as niah_suite
from dsv4.evaluate import ppl as ppl_suite
from dsv4.evaluate import tasks as tasks_suite
from dsv4.evaluate.backends import EvalError
from dsv4.evaluate.math_answers import load_items as load_math_items
from dsv4.evaluate.math_answers import score_items as score_math
from dsv4.evaluate.math_answers import summarize as summarize_math
from dsv4.evaluate.report import write_plots
from dsv4.evaluate.store import ResultStore, data_fingerprint
from dsv4.files import write_json_atomic

SUITES = ("ppl", "niah", "tasks", "mc", "math")


@dataclass
class EvalOptions:
    data: list[str] = field(default_factory=list)  # benchmark / text files
    dev: str | None = None  # few-shot examples (mc, math)
    limit: int | None = None  # first N items only
    context: int = 8192  # ppl window, NIAH upper length, endpoint ppl piece size
    stride: int | None = None  # ppl: default context // 2
    lengths: list[int] | None = None  # niah
    depths: list[float] = field(default_factory=lambda: list(niah_suite.DEFAULT_DEPTHS))
    trials: int = 1
    variant: str = "single"  # niah: single | multikey
    keys: int = 4  # niah multikey: needles per prompt
    haystack: str = "corpus"  # niah: corpus | filler
    shots: int = 5  # mc, math
    scoring: list[str] | None = None  # mc: letter / text / generate (None: letter + generate)
    domains: str | None = None  # tasks
    domain_module: str | None = None  # tasks: a Python file defining more Domain objects
    n_problems: int | None = None  # tasks: per domain (None: the domain's eval set size)
    chat: bool = False
    think: str = "none"
    chat_encoding: str = "v4"  # local models' chat prompts (an endpoint renders its own)
    max_tokens: int | None = None
    fresh: bool = False

    def suite_settings(self, suite: str) -> dict[str, Any]:
        """The options that decide each item's result (a different value = another run).
        `limit` is not one: a run with a larger --limit reuses the items already done."""
        keep = {"ppl": ("data", "context", "stride"),
                "niah": ("data", "lengths", "depths", "trials", "variant", "keys", "haystack",
                         "chat", "chat_encoding", "max_tokens"),
                "tasks": ("domains", "domain_module", "n_problems", "think", "chat_encoding",
                          "max_tokens"),
                "mc": ("data", "dev", "shots", "scoring", "chat", "think", "chat_encoding",
                       "max_tokens"),
                "math": ("data", "dev", "shots", "chat", "think", "chat_encoding",
                         "max_tokens")}[suite]
        values = asdict(self)
        return {k: values[k] for k in keep}


def run_items(store: ResultStore, keys: list[str], compute: Callable[[list[int]], list[dict]],
              batch: int, desc: str, progress: bool,
              on_record: Callable[[dict], None] | None = None) -> int:
    """Compute the items whose keys are not done yet, `batch` at a time; returns how many."""
    from tqdm.auto import tqdm

    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise EvalError(f"two items share the key {duplicate!r}")
    pending = [i for i, k in enumerate(keys) if not store.done(k)]
    bar = tqdm(total=len(keys), initial=len(keys) - len(pending), desc=desc, unit="item",
               disable=not progress)
    try:
        for s in range(0, len(pending), batch):
            for record in compute(pending[s: s + batch]):
                store.add(record)
                bar.update(1)
                if on_record is not None:
                    on_record(record)
    finally:
        bar.close()
    return len(pending)


def evaluate(backend, suite: str, out_dir: str | Path, options: EvalOptions | None = None, *,
             progress: bool = False, on_record: Callable[[dict], None] | None = None,
             plots: bool = True, domains: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one suite on a backend; writes out_dir/{settings.json, items.jsonl, results.json}
    and PNGs, returns the results dict. `on_record` sees every item as it is stored;
    `domains` (tasks suite) replaces `dsv4.tasks.DOMAINS`."""
    if suite not in SUITES:
        raise EvalError(f"unknown suite {suite!r}: one of {', '.join(SUITES)}")
    opts = options or EvalOptions()
    out = Path(out_dir)
    settings = {"suite": suite, "model": backend.label, **opts.suite_settings(suite),
                # the weights and the data behind the names above: a changed checkpoint or
                # data file is another run, not one to resume
                "weights": getattr(backend, "fingerprint", None),
                "data_fingerprint": data_fingerprint([*opts.data, opts.dev,
                                                      opts.domain_module])}
    store = ResultStore(out, settings, fresh=opts.fresh)
    start = time.perf_counter()
    runner = {"ppl": _ppl, "niah": _niah, "tasks": _tasks, "mc": _mc, "math": _math}[suite]
    ctx = _Context(backend, opts, store, progress, on_record, domains)
    summary, extra = runner(ctx)
    results = {"suite": suite, "model": backend.label, "backend": backend.kind,
               "settings": settings, "summary": summary, "items": len(ctx.keys),
               "computed_now": ctx.computed, "resumed_items": store.resumed,
               "seconds": round(time.perf_counter() - start, 2), **extra}
    results["plots"] = [str(p) for p in write_plots(results, out)] if plots else []
    write_json_atomic(out / "results.json", _finite(results))
    return results


@dataclass
class _Context:
    backend: Any
    opts: EvalOptions
    store: ResultStore
    progress: bool
    on_record: Callable[[dict], None] | None
    domains: dict[str, Any] | None = None
    keys: list[str] = field(default_factory=list)
    computed: int = 0

    def run(self, keys: list[str], compute, batch: int, desc: str) -> list[dict]:
        self.keys = keys
        self.computed = run_items(self.store, keys, compute, batch, desc, self.progress,
                                  self.on_record)
        return self.store.ordered(keys)


def _limited(items: list, limit: int | None) -> list:
    return items[:limit] if limit else items


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------


def _ppl(ctx: _Context):
    b, o = ctx.backend, ctx.opts
    if b.kind == "endpoint" and not b.probe_logprobs():
        raise EvalError(f"the ppl suite needs log-probabilities: {b.logprobs_reason}")
    docs = _limited(ppl_suite.load_documents(o.data or None), o.limit)
    context = min(o.context, b.model.cfg.max_seq_len) if b.kind == "local" else o.context
    stride = o.stride or max(1, context // 2)

    def compute(indices):
        if b.kind == "endpoint":
            return b.map(lambda i: ppl_suite.score_document_endpoint(b, docs[i], context),
                         indices)
        return [ppl_suite.score_document_local(b, docs[i], context, stride) for i in indices]

    batch = b.batch if b.kind == "endpoint" else 1
    records = ctx.run([d.key for d in docs], compute, batch, "ppl")
    notes = {"method": "sliding window" if b.kind == "local" else "endpoint echo",
             "context": context, "stride": stride if b.kind == "local" else None,
             "corpus": o.data or "default corpus, validation split"}
    return ppl_suite.summarize(records), {"method": notes}


def _haystack_text(o: EvalOptions) -> str:
    if o.haystack == "filler":
        return niah_suite.FILLER * 200
    if o.haystack != "corpus":
        raise EvalError(f"--haystack {o.haystack!r}: corpus or filler")
    docs = ppl_suite.load_documents(o.data or None)
    return "\n".join(d.text for d in docs)


def _niah(ctx: _Context):
    b, o = ctx.backend, ctx.opts
    if o.variant not in ("single", "multikey"):
        raise EvalError(f"--variant {o.variant!r}: single or multikey")
    if o.variant == "multikey" and not 2 <= o.keys <= len(niah_suite.NAMES):
        raise EvalError(f"--keys {o.keys}: between 2 and {len(niah_suite.NAMES)}")
    max_tokens = o.max_tokens or 8
    lengths = o.lengths or niah_suite.default_lengths(o.context)
    if b.kind == "local":  # each prompt gets a cache of its own size: the model's limit counts
        most = b.model.cfg.max_seq_len - max_tokens
        too_long = [n for n in lengths if n > most]
        if too_long:
            raise EvalError(f"--lengths {too_long[0]}: longer than the model's max_seq_len "
                            f"{b.model.cfg.max_seq_len} minus --max-tokens {max_tokens}")
    items = _limited(niah_suite.make_items(lengths, o.depths, o.trials, o.variant), o.limit)
    haystack = niah_suite.Haystack(_haystack_text(o), b.count_tokens)

    def prompt(item):
        return niah_suite.build_prompt(item, haystack, o.variant, o.keys, b.count_tokens)

    def compute(indices):
        chosen = [items[i] for i in indices]
        if b.kind == "endpoint":
            results = niah_suite.run_items_endpoint(b, chosen, [prompt(it) for it in chosen],
                                                    o.chat, max_tokens)
        else:
            results = [niah_suite.run_item_local(b, it, prompt(it), o.chat, max_tokens)
                       for it in chosen]
        return [{"key": it.key, "length": it.length, "depth": it.depth, "answer": it.answer,
                 **r} for it, r in zip(chosen, results)]

    batch = b.batch if b.kind == "endpoint" else 1
    records = ctx.run([it.key for it in items], compute, batch, "niah")
    extra: dict[str, Any] = {}
    if b.kind == "endpoint":
        extra["skipped"] = [{"metric": "indexer recall", "reason": "needs a local dsv4 model "
                             "(the indexer's choices are not visible through an endpoint)"}]
        if b.tokenizer is None:
            extra["notes"] = ["lengths are estimated as UTF-8 bytes / 4 (no --tokenizer given)"]
    return niah_suite.summarize(records, items), extra


def _tasks(ctx: _Context):
    b, o = ctx.backend, ctx.opts
    known = ctx.domains if ctx.domains is not None else tasks_suite.available_domains(
        o.domain_module)
    domains = tasks_suite.select_domains(known, o.domains)
    items = []
    for domain in domains:
        problems = _limited(tasks_suite.domain_problems(domain, o.n_problems), o.limit)
        items += [(f"{domain.name}:{i}", domain, p) for i, p in enumerate(problems)]
    # 24: what dsv4.posttrain.common.domain_accuracy gives the built-in domains' short answers
    max_tokens = o.max_tokens or (24 if o.think == "none" else 1024)

    def compute(indices):
        return tasks_suite.score_items(b, [items[i] for i in indices], o.think, max_tokens)

    records = ctx.run([k for k, _, _ in items], compute, b.batch, "tasks")
    return tasks_suite.summarize(records), {"think": o.think}


def _data_file(o: EvalOptions, suite: str) -> str:
    if len(o.data) != 1:
        raise EvalError(f"the {suite} suite needs one benchmark file: --data FILE "
                        "(.jsonl, .json, .csv or .parquet; nothing is downloaded)")
    return o.data[0]


def _mc(ctx: _Context):
    b, o = ctx.backend, ctx.opts
    items = mc_suite.load_items(_data_file(o, "mc"))
    dev = mc_suite.load_items(o.dev) if o.dev else None
    pool, scored = mc_suite.split_shots(items, dev, o.shots)
    scored = _limited(scored, o.limit)
    scorings = list(o.scoring or ["letter", "generate"])
    bad = [s for s in scorings if s not in mc_suite.SCORINGS]
    if bad:
        raise EvalError(f"--scoring {bad[0]!r}: one of {', '.join(mc_suite.SCORINGS)}")
    skipped = []
    needs_logprobs = [s for s in scorings if s in ("letter", "text")]
    if needs_logprobs and b.kind == "endpoint" and not b.probe_logprobs():
        if o.scoring:  # asked for explicitly: an error, not a silent change
            raise EvalError(f"--scoring {','.join(needs_logprobs)} needs log-probabilities: "
                            f"{b.logprobs_reason}; use --scoring generate")
        scorings = [s for s in scorings if s not in needs_logprobs]
        skipped = [{"metric": f"{s} log-likelihood", "reason": b.logprobs_reason}
                   for s in needs_logprobs]
    max_tokens = o.max_tokens or (4 if o.think == "none" else 1024)
    chat = o.chat or o.think != "none"

    def compute(indices):
        return mc_suite.score_items(b, [scored[i] for i in indices], pool, o.shots, scorings,
                                    chat, o.think, max_tokens)

    records = ctx.run([it.key for it in scored], compute, b.batch, "mc")
    return mc_suite.summarize(records, scorings), {"skipped": skipped, "scorings": scorings}


def _math(ctx: _Context):
    b, o = ctx.backend, ctx.opts
    items = load_math_items(_data_file(o, "math"))
    if o.dev:
        shots, scored = load_math_items(o.dev)[: o.shots], items
    elif o.shots >= len(items):
        raise EvalError(f"--shots {o.shots} leaves no rows to score ({len(items)} rows)")
    else:
        shots, scored = items[: o.shots], items[o.shots:]
    scored = _limited(scored, o.limit)
    chat = o.chat or o.think != "none"
    max_tokens = o.max_tokens or (256 if o.think == "none" else 2048)

    def compute(indices):
        return score_math(b, [scored[i] for i in indices], shots, chat, o.think, max_tokens)

    records = ctx.run([it.key for it in scored], compute, b.batch, "math")
    return summarize_math(records), {}
