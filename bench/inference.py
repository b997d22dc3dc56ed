"""Inference benchmark: dsv4 eager, dsv4 compiled and transformers' DeepseekV4ForCausalLM on the
same weights, in one process with the same thread count.

    python bench/inference.py                                 # small, 2K and 8K, 2 threads
    python bench/inference.py --preset nano --contexts 512 8192 --no-hf

For each context: prefill tokens/s (dsv4: chunked prefill through the hybrid cache;
transformers: one eager forward; best of 2), decode tokens/s at batch 1 and batch 16 (the batch
shares the prefilled context, copied into every slot) for dsv4 eager, dsv4 compiled
(`inference.engine.CompiledDecode`, its compile time reported apart) and transformers (its context
built by its own cached prefill, untimed), measured in interleaved rounds with the best round
kept, so a machine whose speed drifts favours no side. Also: aten operators per layer in one
eager batch-1 decode step (torch profiler, nested calls included), and cache bytes against the
analytic formula. Prints a table and the ratios; writes a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ModelConfig  # noqa: E402
from dsv4.inference.cache import KVCache  # noqa: E402
from dsv4.inference.engine import CompiledDecode, forward_step  # noqa: E402
from dsv4.model import costs  # noqa: E402
from dsv4.model.network import Transformer, cast_model  # noqa: E402

CHUNK = 512
DECODE_STEPS = 16


def rate(tokens: int, fn, repeats: int = DECODE_STEPS) -> float:
    """tokens/s of `fn` (one call = `tokens` tokens), after one untimed warm-up call (the
    first call of a compiled bucket compiles it)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return tokens * repeats / (time.perf_counter() - start)


# ---- dsv4 -----------------------------------------------------------------------------------
def prefill(model: Transformer, cache: KVCache, ids: torch.Tensor) -> float:
    cache.reset(0)
    slot0 = torch.tensor([0])
    start = time.perf_counter()
    for s in range(0, ids.shape[1], CHUNK):
        forward_step(model, cache, slot0, ids[:, s : s + CHUNK])
    return ids.shape[1] / (time.perf_counter() - start)


def decode_step(step, cache: KVCache, batch: int, token: torch.Tensor):
    """A call that decodes one token in each of `batch` slots and rolls the cache back, so
    every call sees the same context."""
    slots = torch.arange(batch)
    ids = token.expand(batch, 1).contiguous()

    def one() -> None:
        step(slots, ids)
        cache.lengths[slots] -= 1

    return one


def aten_ops_per_layer(model: Transformer, cache: KVCache, token: torch.Tensor) -> float:
    from torch.profiler import ProfilerActivity, profile

    slots = torch.tensor([0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_step(model, cache, slots, token)
    cache.lengths[slots] -= 1
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return ops / model.cfg.n_layers


def ours(model: Transformer, cache: KVCache, compiled: CompiledDecode | None,
         ids: torch.Tensor, batch: int) -> tuple[dict, dict]:
    """Prefill figures and the decode calls of dsv4 eager (and compiled) at batch 1 and
    `batch`, over `ids` prefilled into slot 0 and copied to the others."""
    length = ids.shape[1]
    row = {"prefill": max(prefill(model, cache, ids) for _ in range(2)),
           "cache_bytes": cache.used_bytes(0),
           "formula_bytes": costs.kv_cache_bytes(model.cfg, length, "bf16")["total_bytes"]}
    for slot in range(1, batch):
        cache.copy_slot(0, slot)
    token = ids[:, -1:]
    row["ops_per_layer"] = aten_ops_per_layer(model, cache, token)

    def eager(slots, step_ids):
        forward_step(model, cache, slots, step_ids)

    calls = {}
    for b in (1, batch):
        calls[f"eager_b{b}"] = (b, decode_step(eager, cache, b, token))
        if compiled is not None:
            calls[f"compiled_b{b}"] = (b, decode_step(compiled, cache, b, token))
    return row, calls


# ---- transformers -----------------------------------------------------------------------------
def repeat_cache(cache, batch: int) -> None:
    """Repeat a batch-1 transformers cache along the batch dim (every tensor attribute)."""
    def rep(t):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1:
            return t.repeat(batch, *([1] * (t.dim() - 1)))
        if isinstance(t, dict):
            return {k: rep(v) for k, v in t.items()}
        return t

    for layer in cache.layers:
        for key, value in list(vars(layer).items()):
            setattr(layer, key, rep(value))
        if hasattr(layer, "keys") and hasattr(layer, "values"):
            layer.values = layer.keys


def theirs(hf, ids: torch.Tensor, batch: int) -> tuple[dict, dict]:
    """One eager forward of the whole context (prefill), and the decode calls at batch 1 and
    `batch` over a context built with transformers' own cached prefill in 1K chunks. Each
    call appends to its cache (no rollback): the timed steps lengthen the context by < 1%."""
    import copy

    from transformers import DynamicCache

    length = ids.shape[1]
    row = {"prefill": 0.0}
    for _ in range(2):  # best of 2, as dsv4's
        start = time.perf_counter()
        hf(input_ids=ids, use_cache=False)
        row["prefill"] = max(row["prefill"], length / (time.perf_counter() - start))
    single = DynamicCache(config=hf.config)
    for s in range(0, length, 1024):
        hf(input_ids=ids[:, s : s + 1024], cache=single, use_cache=True)
    many = copy.deepcopy(single)
    repeat_cache(many, batch)
    token = ids[:, -1:]
    calls = {"decode_b1": (1, lambda: hf(input_ids=token, cache=single, use_cache=True))}
    tokens = token.expand(batch, 1)
    calls[f"decode_b{batch}"] = (batch, lambda: hf(input_ids=tokens, cache=many,
                                                   use_cache=True))
    return row, calls


def interleaved_rates(calls: dict, rounds: int) -> dict:
    """tokens/s of every call, measured in turns (A B C A B C ...) and the best round kept:
    a machine whose speed drifts during the run then biases no side."""
    best = dict.fromkeys(calls, 0.0)
    for _ in range(rounds):
        for name, (tokens, call) in calls.items():
            best[name] = max(best[name], rate(tokens, call))
    return best


# ---- report ---------------------------------------------------------------------------------
def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}x"


def report(rows: dict, hf_rows: dict, batch: int, compile_s: float | None) -> list[str]:
    lines = [f"{'context':>8} | {'':>22} | {'prefill tok/s':>13} | {'decode b=1':>10} | "
             f"{f'decode b={batch}':>11}", "-" * 78]
    for length, r in rows.items():
        h = hf_rows.get(length, {})
        for label, pre, d1, db in (
            ("dsv4 eager", r["prefill"], r["eager_b1"], r[f"eager_b{batch}"]),
            ("dsv4 compiled", None, r.get("compiled_b1"), r.get(f"compiled_b{batch}")),
            ("transformers (eager)", h.get("prefill"), h.get("decode_b1"),
             h.get(f"decode_b{batch}")),
        ):
            lines.append(f"{length:>8} | {label:>22} | {fmt(pre):>13} | {fmt(d1):>10} | "
                         f"{fmt(db):>11}")
    lines += ["", "ratios (dsv4 / transformers, same weights, same process and threads):"]
    for length, r in rows.items():
        h = hf_rows.get(length, {})
        best = {b: max(x for x in (r[f"eager_b{b}"], r.get(f"compiled_b{b}")) if x)
                for b in (1, batch)}
        lines.append(
            f"  {length}: prefill {ratio(r['prefill'], h.get('prefill'))}; decode b=1 eager "
            f"{ratio(r['eager_b1'], h.get('decode_b1'))}, compiled "
            f"{ratio(r.get('compiled_b1'), h.get('decode_b1'))} (target >= 3x); b={batch} "
            f"eager {ratio(r[f'eager_b{batch}'], h.get(f'decode_b{batch}'))}, compiled "
            f"{ratio(r.get(f'compiled_b{batch}'), h.get(f'decode_b{batch}'))} (target >= 3x)")
        lines.append(f"  {length}: best decode b=1 {fmt(best[1])} tok/s, b={batch} "
                     f"{fmt(best[batch])} tok/s; cache bytes {r['cache_bytes']:,} = "
                     f"{r['cache_bytes'] / r['formula_bytes']:.4f} of the formula")
    first = next(iter(rows.values()))
    lines.append(f"  aten ops per layer, one eager b=1 decode step: {first['ops_per_layer']:,.0f} "
                 "(target <= 400)")
    if compile_s is not None:
        lines.append(f"  compile time (batch buckets 1 and {batch}, first calls): "
                     f"{compile_s:.1f} s")
    return lines


def plot(rows: dict, hf_rows: dict, batch: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("eager_b1", "dsv4 eager b=1"), ("compiled_b1", "dsv4 compiled b=1"),
                       (f"eager_b{batch}", f"dsv4 eager b={batch}"),
                       (f"compiled_b{batch}", f"dsv4 compiled b={batch}")):
        if key in rows[lengths[0]]:
            ax.plot(lengths, [rows[n][key] for n in lengths], marker="o", label=label)
    for key, label in (("decode_b1", "transformers b=1"),
                       (f"decode_b{batch}", f"transformers b={batch}")):
        if hf_rows:
            ax.plot(lengths, [hf_rows.get(n, {}).get(key, float("nan")) for n in lengths],
                    marker="x", linestyle="--", label=label)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip dsv4 compiled")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved decode measurements, best kept (default 3)")
    parser.add_argument("--png", default="bench/out/inference.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model = cast_model(model, torch.bfloat16).eval()  # as the commands load it
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"bf16, {torch.get_num_threads()} threads, decode batch {args.batch}", flush=True)
    # One cache for every context: compiled shapes follow the capacity, so one compile serves
    # all rows (static shapes cost what the capacity holds, not what a context uses).
    cache = KVCache(model, slots=args.batch, capacity=max(args.contexts) + 2 * DECODE_STEPS)
    compiled = None if args.no_compile else CompiledDecode(model, cache, args.batch)
    hf = None
    if not args.no_hf:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from parity_utils import hf_model_from

        hf = hf_model_from(model.float()).to(torch.bfloat16).eval()
        cast_model(model, torch.bfloat16)
    rows, hf_rows = {}, {}
    with torch.inference_mode():
        for length in args.contexts:
            gen = torch.Generator().manual_seed(length)
            ids = torch.randint(0, cfg.vocab_size, (1, length), generator=gen)
            rows[length], calls = ours(model, cache, compiled, ids, args.batch)
            if hf is not None:
                hf_rows[length], hf_calls = theirs(hf, ids, args.batch)
                calls.update(hf_calls)
            rates = interleaved_rates(calls, args.rounds)
            rows[length].update({k: v for k, v in rates.items() if not k.startswith("decode")})
            hf_rows.get(length, {}).update({k: v for k, v in rates.items()
                                            if k.startswith("decode")})
            print(f"  {length}: dsv4 {rows[length]}; transformers {hf_rows.get(length)}",
                  flush=True)
    compile_s = compiled.compile_seconds if compiled is not None else None
    print("\n".join(["", *report(rows, hf_rows, args.batch, compile_s)]))
    if args.png:
        plot(rows, hf_rows, args.batch, args.png)


if __name__ == "__main__":
    main()
