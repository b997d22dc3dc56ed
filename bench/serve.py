"""Serving benchmark: aggregate generation throughput and time to first token of `dsv4 serve`
under concurrent streaming clients.

    python bench/serve.py                                  # small preset, c = 1, 8, 32
    python bench/serve.py --threads 1 --max-tokens 32 --concurrency 1 8 32

The server is the real command, `dsv4 serve --preset PRESET --random` (bf16, `--max-batch` = the
largest concurrency), in a child process on a loopback port, so the clients' own Python work
does not compete with it for the GIL; clients are the official async `openai` client in this
process, streaming /v1/completions with token-id prompts, greedy and ignore_eos so
every request generates exactly --max-tokens tokens. "engine busy" is the share of the
wall time the server's engine spent inside `step()` (the rest: HTTP, queueing, idle). At each
concurrency c, c clients each send --rounds requests back to back (closed loop). Aggregate
tokens/s = all generated tokens / the level's wall time; TTFT = request sent -> first streamed
token. Prints a table, checks the target (c=32 at least 8x the aggregate throughput of c=1)
and writes bench/out/serve.json (and a PNG with --png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ModelConfig  # noqa: E402
from dsv4.files import write_json_atomic  # noqa: E402

MODEL_NAME = "bench"
TARGET_CONCURRENCY, TARGET_RATIO = 32, 8.0


def start_server(args: argparse.Namespace, capacity: int) -> tuple[subprocess.Popen, str]:
    """`dsv4 serve` on a free loopback port; returns (process, base URL) once /health answers."""
    command = [sys.executable, "-m", "dsv4", "serve", "--preset", args.preset, "--random",
               "--port", "0", "--served-model-name", MODEL_NAME, "--dtype", args.dtype,
               "--max-batch", str(max(args.concurrency)), "--context", str(capacity),
               "--max-queue", "1024", "--threads", str(args.threads)]
    if args.device:
        command += ["--device", args.device]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"dsv4 serve did not start: {line!r}")
    url = line.split()[-1]
    while True:
        try:
            health(url)
            return proc, url
        except urllib.error.URLError:
            if proc.poll() is not None:
                raise SystemExit("dsv4 serve exited") from None
            time.sleep(0.1)


async def one_request(client, prompt: list[int], max_tokens: int) -> dict:
    sent = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": (first or time.perf_counter()) - sent, "tokens": tokens}


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
        return json.loads(response.read())


def engine_time(url: str) -> tuple[int, float]:
    """(engine steps, seconds spent in them) so far, from the server's /health."""
    state = health(url)
    return state["engine_steps"], state["engine_step_seconds"]


async def run_level(url: str, prompts: list[list[int]], concurrency: int, rounds: int,
                    max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    results: list[dict] = []

    async def worker(w: int) -> None:
        for r in range(rounds):
            prompt = prompts[(w * rounds + r) % len(prompts)]
            results.append(await one_request(client, prompt, max_tokens))

    steps_before, busy_before = engine_time(url)
    async with client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    steps, busy = engine_time(url)
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens,
            "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": statistics.median(ttft),
            "ttft_max_s": ttft[-1], "engine_steps": steps - steps_before,
            "engine_busy": (busy - busy_before) / elapsed}


def report(rows: list[dict]) -> list[str]:
    base = rows[0]["tokens_per_s"]
    lines = [f"{'concurrency':>11} | {'requests':>8} | {'gen tok/s':>9} | {'vs c=1':>6} | "
             f"{'TTFT mean':>9} | {'TTFT p50':>8} | {'TTFT max':>8} | {'ms/step':>7} | "
             f"{'engine busy':>11}", "-" * 104]
    for r in rows:
        step_ms = 1000 * r["engine_busy"] * r["seconds"] / max(1, r["engine_steps"])
        lines.append(f"{r['concurrency']:>11} | {r['requests']:>8} | {r['tokens_per_s']:>9.1f} | "
                     f"{r['tokens_per_s'] / base:>5.1f}x | {r['ttft_mean_s']:>8.3f}s | "
                     f"{r['ttft_p50_s']:>7.3f}s | {r['ttft_max_s']:>7.3f}s | "
                     f"{step_ms:>7.1f} | "
                     f"{r['engine_busy']:>11.0%}")
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(c, [r["tokens_per_s"] for r in rows], marker="o")
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens/s",
            title="aggregate throughput")
    ax2.plot(c, [r["ttft_mean_s"] for r in rows], marker="o", label="mean")
    ax2.plot(c, [r["ttft_p50_s"] for r in rows], marker="x", label="p50")
    ax2.set(xscale="log", xlabel="concurrent clients", ylabel="seconds",
            title="time to first token")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests each client sends back to back (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="bench/out/serve.json")
    parser.add_argument("--png", default=None, help="also plot to this PNG")
    args = parser.parse_args()

    cfg = ModelConfig.from_preset(args.preset)
    capacity = args.prompt_tokens + args.max_tokens + 8
    gen = torch.Generator().manual_seed(0)
    prompts = [[0] + torch.randint(300, cfg.vocab_size, (args.prompt_tokens - 1,),
                                   generator=gen).tolist() for _ in range(64)]
    proc, url = start_server(args, capacity)
    print(f"{args.preset} preset (random weights), {args.dtype}, server on {args.threads} "
          f"thread(s): {args.prompt_tokens}-token prompts, {args.max_tokens} generated tokens "
          f"each, {args.rounds} rounds per client, max batch {max(args.concurrency)}")
    try:
        asyncio.run(run_level(url, prompts, 1, 1, 4))  # warm-up
        rows = []
        for c in args.concurrency:
            rows.append(asyncio.run(run_level(url, prompts, c, args.rounds, args.max_tokens)))
            print(f"  c={c}: {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = report(rows)
    base = {r["concurrency"]: r["tokens_per_s"] for r in rows}
    if 1 in base and TARGET_CONCURRENCY in base:
        ratio = base[TARGET_CONCURRENCY] / base[1]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        lines += ["", f"target: c={TARGET_CONCURRENCY} aggregate throughput {ratio:.1f}x c=1 "
                      f"(target >= {TARGET_RATIO:.0f}x): {verdict}"]
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, {"preset": args.preset, "dtype": args.dtype,
                                  "device": args.device or "default",
                                  "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                  "max_tokens": args.max_tokens, "rounds": args.rounds,
                                  "rows": rows})
    print(f"wrote {args.json}")
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
