"""Inference benchmark: dsv4's engine vs transformers' DeepseekV4ForCausalLM, same weights.

    python bench/inference.py                       # small preset, 1K / 8K / 32K, 2 threads
    python bench/inference.py --contexts 1024 2048 --png /tmp/inference.png

For each context length: prefill tokens/s (dsv4: chunked prefill through the hybrid cache;
transformers: one eager forward, run in a child process killed after --hf-cap seconds, so a
capped figure is an upper bound), decode tokens/s at batch 1 and batch 16 (the batch shares the
prefilled context, copied into every slot), cache bytes (dsv4 vs transformers' cache vs the
analytic formula of `dsv4.costs`), and peak RSS. Prints a table, checks the targets of the
inference issue and writes a PNG of speed and memory against context.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ModelConfig, costs  # noqa: E402
from dsv4.cache import KVCache  # noqa: E402
from dsv4.engine import forward_step  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

CHUNK = 512
DECODE_STEPS = 8


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- dsv4 -----------------------------------------------------------------------------------
def ours(model: Transformer, length: int, batch: int) -> dict:
    ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator()
                        .manual_seed(length))
    cache = KVCache(model, slots=batch, capacity=length + DECODE_STEPS + 1)
    slot0 = torch.tensor([0])
    start = time.perf_counter()
    for s in range(0, length, CHUNK):
        forward_step(model, cache, slot0, ids[:, s : s + CHUNK])
    prefill = length / (time.perf_counter() - start)
    used = cache.used_bytes(0)
    for slot in range(1, batch):
        cache.copy_slot(0, slot)
    row = {"prefill": prefill, "cache_bytes": used,
           "formula_bytes": costs.kv_cache_bytes(model.cfg, length, "bf16")["total_bytes"]}
    for b in (1, batch):
        slots = torch.arange(b)
        step_ids = ids[:, -1:].expand(b, 1)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            forward_step(model, cache, slots, step_ids)
        row[f"decode_b{b}"] = b * DECODE_STEPS / (time.perf_counter() - start)
        cache.lengths[slots] -= DECODE_STEPS  # back to the prompt for the next batch size
    row["peak_rss_mib"] = peak_rss_mib()
    return row


# ---- transformers -----------------------------------------------------------------------------
def hf_prefill_child(hf, length: int, queue) -> None:
    ids = torch.randint(0, hf.config.vocab_size, (1, length))
    start = time.perf_counter()
    with torch.no_grad():
        hf(input_ids=ids, use_cache=False)
    queue.put(length / (time.perf_counter() - start))


def hf_prefill(hf, length: int, cap: float) -> tuple[float, bool]:
    """tokens/s of one eager forward, or the bound length/cap when killed at the cap."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=hf_prefill_child, args=(hf, length, queue))
    child.start()
    child.join(cap)
    if child.is_alive():
        child.kill()
        child.join()
        return length / cap, True
    if child.exitcode != 0:
        return float("nan"), True  # killed for memory, typically
    return queue.get(), False


def cache_tensor_bytes(cache) -> int:
    total, seen = 0, set()

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for layer in cache.layers:
        for value in vars(layer).values():
            add(value)
    return total


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


def hf_decode(hf, length: int, batch: int, cap: float) -> dict:
    """Chunked cached prefill (untimed, capped), then timed decode at batch 1 and `batch`."""
    from transformers import DynamicCache

    ids = torch.randint(0, hf.config.vocab_size, (1, length))
    cache = DynamicCache(config=hf.config)
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, length, 1024):
            hf(input_ids=ids[:, s : s + 1024], cache=cache, use_cache=True)
            if time.perf_counter() - start > cap:
                return {"cache_bytes": float("nan"), "decode_b1": float("nan"),
                        f"decode_b{batch}": float("nan"), "note": "prefill over the cap"}
        row = {"cache_bytes": cache_tensor_bytes(cache)}
        step = ids[:, -1:]
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            hf(input_ids=step, cache=cache, use_cache=True)
        row["decode_b1"] = DECODE_STEPS / (time.perf_counter() - start)
        repeat_cache(cache, batch)
        step = step.expand(batch, 1)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            hf(input_ids=step, cache=cache, use_cache=True)
        row[f"decode_b{batch}"] = batch * DECODE_STEPS / (time.perf_counter() - start)
    return row


# ---- report ---------------------------------------------------------------------------------
def fmt(x: float, capped: bool = False) -> str:
    if x != x:  # nan
        return "n/a"
    return ("<" if capped else "") + f"{x:,.0f}"


def report(rows: dict, hf_rows: dict, batch: int, two_k: float | None) -> list[str]:
    lines = [
        f"{'context':>8} | {'prefill tok/s':>22} | {'decode b=1 tok/s':>20} | "
        f"{f'decode b={batch} tok/s':>21} | {'cache KiB (ours/HF/formula)':>30} | peak RSS",
        "-" * 130,
    ]
    for length, r in rows.items():
        h = hf_rows.get(length, {})
        pre = f"{fmt(r['prefill'])} / {fmt(h.get('prefill', float('nan')), h.get('capped'))}"
        d1 = f"{fmt(r['decode_b1'])} / {fmt(h.get('decode_b1', float('nan')))}"
        db = f"{fmt(r[f'decode_b{batch}'])} / {fmt(h.get(f'decode_b{batch}', float('nan')))}"
        kib = (f"{r['cache_bytes'] / 1024:,.0f} / {h.get('cache_bytes', float('nan')) / 1024:,.0f}"
               f" / {r['formula_bytes'] / 1024:,.0f}")
        lines.append(f"{length:>8} | {pre:>22} | {d1:>20} | {db:>21} | {kib:>30} | "
                     f"{r['peak_rss_mib']:,.0f} MiB")
    lines.append("(each cell: dsv4 / transformers; '<' = transformers was stopped at the cap, "
                 "its true figure is lower)")
    lines.append("")
    lines.append("targets:")
    for length, r in rows.items():
        h = hf_rows.get(length, {})
        if "prefill" in h and h["prefill"] == h["prefill"]:
            ratio = r["prefill"] / h["prefill"]
            bound = " (at least: transformers capped)" if h.get("capped") else ""
            lines.append(f"  prefill {length}: {ratio:.1f}x transformers{bound}")
        if "decode_b1" in h and h["decode_b1"] == h["decode_b1"]:
            lines.append(f"  decode b=1 {length}: {r['decode_b1'] / h['decode_b1']:.1f}x "
                         "transformers (target >= 3x)")
        lines.append(f"  cache bytes {length}: {r['cache_bytes'] / r['formula_bytes']:.4f} of the "
                     "formula (target within 2%)")
    longest = max(rows)
    if two_k:
        lines.append(f"  linear prefill: {rows[longest]['prefill'] / two_k:.2f} of the 2K rate at "
                     f"{longest} (target >= 0.5)")
    return lines


def plot(rows: dict, hf_rows: dict, batch: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("prefill", "prefill"), ("decode_b1", "decode b=1"),
                       (f"decode_b{batch}", f"decode b={batch}")):
        ax1.plot(lengths, [rows[n][key] for n in lengths], marker="o", label=f"dsv4 {label}")
        hf = [hf_rows.get(n, {}).get(key, float("nan")) for n in lengths]
        ax1.plot(lengths, hf, marker="x", linestyle="--", label=f"transformers {label}")
    ax1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s",
            title="speed")
    ax1.legend(fontsize=7)
    ax2.plot(lengths, [rows[n]["cache_bytes"] / 2**20 for n in lengths], marker="o",
             label="dsv4 cache")
    ax2.plot(lengths, [rows[n]["formula_bytes"] / 2**20 for n in lengths], linestyle=":",
             label="formula (bf16)")
    ax2.plot(lengths, [hf_rows.get(n, {}).get("cache_bytes", float("nan")) / 2**20
                       for n in lengths], marker="x", linestyle="--", label="transformers cache")
    ax2.set(xscale="log", xlabel="context (tokens)", ylabel="MiB", title="KV cache, one sequence")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 8192, 32768])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-cap", type=float, default=90.0,
                        help="seconds allowed per transformers measurement (default 90)")
    parser.add_argument("--hf-max-context", type=int, default=8192,
                        help="longest context run through transformers (its eager attention "
                             "needs S x S scores; default 8192)")
    parser.add_argument("--png", default="bench/out/inference.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset).replace(
        max_seq_len=max(65536, max(args.contexts) + 64))
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval()
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"bf16, {args.threads} threads, decode batch {args.batch}")
    rows = {}
    with torch.no_grad():
        for length in args.contexts:
            rows[length] = ours(model, length, args.batch)
            print(f"  dsv4 {length}: {rows[length]}", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from parity_utils import hf_model_from

    hf = hf_model_from(model.float()).to(torch.bfloat16)
    model.to(torch.bfloat16)
    hf_rows = {}
    for length in args.contexts:
        if length > args.hf_max_context:
            continue
        rate, capped = hf_prefill(hf, length, args.hf_cap)
        hf_rows[length] = {"prefill": rate, "capped": capped,
                           **hf_decode(hf, length, args.batch, args.hf_cap)}
        print(f"  transformers {length}: {hf_rows[length]}", flush=True)
    two_k = rows.get(2048, {}).get("prefill")
    print("\n".join(["", *report(rows, hf_rows, args.batch, two_k)]))
    if args.png:
        plot(rows, hf_rows, args.batch, args.png)


if __name__ == "__main__":
    main()
