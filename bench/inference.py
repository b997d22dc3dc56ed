"""Inference benchmark: dsv4 eager, dsv4 compiled and transformers' DeepseekV4ForCausalLM on the
same weights, in one process with the same thread count.

    python bench/inference.py                                 # small, 2K and 8K, 2 threads
    python bench/inference.py --preset nano --contexts 512 8192 --no-hf

For each context: prefill tokens/s (dsv4: chunked prefill through the hybrid cache;
transformers: one eager forward), decode tokens/s at batch 1 and batch 16 (the batch shares the
prefilled context, copied into every slot) for dsv4 eager, dsv4 compiled (`--compile`,
`dsv4.engine.CompiledDecode`, its compile time reported apart) and transformers (its context
built by its own cached prefill, untimed). Also: aten operators per layer in one eager batch-1
decode step (torch profiler, nested calls included), and cache bytes against the analytic
formula. Prints a table and the ratios; writes a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ModelConfig, costs  # noqa: E402
from dsv4.cache import KVCache  # noqa: E402
from dsv4.engine import CompiledDecode, forward_step  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

CHUNK = 512
DECODE_STEPS = 16


def rate(tokens: int, fn, repeats: int = DECODE_STEPS) -> float:
    """tokens/s of `fn` (one call = `tokens` tokens), after one untimed warm-up call."""
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


def decode_rate(step, cache: KVCache, batch: int, token: torch.Tensor) -> float:
    """Decode tokens/s at `batch`: every step feeds one token per slot, then the cache is
    rolled back, so each step sees the same context."""
    slots = torch.arange(batch)
    ids = token.expand(batch, 1).contiguous()

    def one() -> None:
        step(slots, ids)
        cache.lengths[slots] -= 1

    return rate(batch, one)


def aten_ops_per_layer(model: Transformer, cache: KVCache, token: torch.Tensor) -> float:
    from torch.profiler import ProfilerActivity, profile

    slots = torch.tensor([0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_step(model, cache, slots, token)
    cache.lengths[slots] -= 1
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return ops / model.cfg.n_layers


def ours(model: Transformer, cache: KVCache, compiled: CompiledDecode | None, length: int,
         batch: int) -> dict:
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=gen)
    row = {"prefill": prefill(model, cache, ids), "cache_bytes": cache.used_bytes(0),
           "formula_bytes": costs.kv_cache_bytes(model.cfg, length, "bf16")["total_bytes"]}
    for slot in range(1, batch):
        cache.copy_slot(0, slot)
    token = ids[:, -1:]

    def eager(slots, step_ids):
        forward_step(model, cache, slots, step_ids)

    for b in (1, batch):
        row[f"eager_b{b}"] = decode_rate(eager, cache, b, token)
        if compiled is not None:
            row[f"compiled_b{b}"] = decode_rate(compiled, cache, b, token)
    row["ops_per_layer"] = aten_ops_per_layer(model, cache, token)
    return row


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


def theirs(hf, length: int, batch: int) -> dict:
    """One eager forward of the whole context (prefill), then cached decode at batch 1 and
    `batch` over a context built with its own cached prefill in 1K chunks."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, hf.config.vocab_size, (1, length), generator=gen)
    start = time.perf_counter()
    hf(input_ids=ids, use_cache=False)
    row = {"prefill": length / (time.perf_counter() - start)}
    cache = DynamicCache(config=hf.config)
    for s in range(0, length, 1024):
        hf(input_ids=ids[:, s : s + 1024], cache=cache, use_cache=True)
    step = ids[:, -1:]
    # Each step appends to transformers' cache (no rollback): the context grows by the few
    # timed steps, which slows it by well under 1%.
    row["decode_b1"] = rate(1, lambda: hf(input_ids=step, cache=cache, use_cache=True))
    repeat_cache(cache, batch)
    steps = step.expand(batch, 1)
    row[f"decode_b{batch}"] = rate(batch, lambda: hf(input_ids=steps, cache=cache,
                                                     use_cache=True))
    return row


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
    parser.add_argument("--png", default="bench/out/inference.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval()
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"bf16, {torch.get_num_threads()} threads, decode batch {args.batch}", flush=True)
    # One cache for every context: compiled shapes follow the capacity, so one compile serves
    # all rows (static shapes cost what the capacity holds, not what a context uses).
    cache = KVCache(model, slots=args.batch, capacity=max(args.contexts) + 2 * DECODE_STEPS)
    compiled = None if args.no_compile else CompiledDecode(model, cache, args.batch)
    rows, hf_rows = {}, {}
    with torch.inference_mode():
        for length in args.contexts:
            rows[length] = ours(model, cache, compiled, length, args.batch)
            print(f"  dsv4 {length}: {rows[length]}", flush=True)
        if not args.no_hf:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from parity_utils import hf_model_from

            hf = hf_model_from(model.float()).to(torch.bfloat16).eval()
            model.to(torch.bfloat16)
            for length in args.contexts:
                hf_rows[length] = theirs(hf, length, args.batch)
                print(f"  transformers {length}: {hf_rows[length]}", flush=True)
    compile_s = compiled.compile_seconds if compiled is not None else None
    print("\n".join(["", *report(rows, hf_rows, args.batch, compile_s)]))
    if args.png:
        plot(rows, hf_rows, args.batch, args.png)


if __name__ == "__main__":
    main()
