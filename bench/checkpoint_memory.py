"""Peak memory of `dsv4.load` against the bytes of the loaded model.

    python bench/checkpoint_memory.py --preset small --experts 32

Saves one model as native (fp32), official (FP8 + FP4 experts) and hf, then loads each in a
fresh process and reports the growth of peak RSS during the load (VmHWM after the load minus
VmRSS before it; the peak is reset first through /proc/self/clear_refs) divided by the bytes
of the tensors of the loaded model. Target: at most 1.3. Linux only. The numbers move a little
with the page cache and allocator on a shared machine.

It also times each load with and without the value check (`verify=True`, the default: every
weight finite and within range), best of --repeats warm loads, to give the check's cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from dsv4.weights import checkpoint
from dsv4.model.network import Transformer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, dtype, quantized = sys.argv[1], (sys.argv[2] if sys.argv[2] != "none" else None), \
    sys.argv[3] == "1"
repeats = int(sys.argv[4])
plan = checkpoint.plan(path)           # headers only
with torch.device("meta"):
    Transformer(plan.config)           # warm the code paths that allocate nothing
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS:")
model = checkpoint.load_plan(plan, dtype=dtype, quantized=quantized)
peak = status("VmHWM:")
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
del model
seconds = {}
for verify in (True, False) * repeats:
    start = time.perf_counter()
    checkpoint.load(path, dtype=dtype, quantized=quantized, verify=verify)
    took = time.perf_counter() - start
    seconds[verify] = min(seconds.get(verify, took), took)
print(json.dumps({"before": before, "peak": peak, "model_bytes": held,
                  "verify_s": seconds[True], "plain_s": seconds[False]}))
"""


def measure(path: Path, dtype: str | None, quantized: bool, repeats: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), dtype or "none", "1" if quantized else "0",
         str(repeats)], capture_output=True, text=True, check=True)
    r = json.loads(done.stdout)
    r["ratio"] = (r["peak"] - r["before"]) / r["model_bytes"]
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--experts", type=int, default=32,
                        help="routed experts per layer, to make the model bigger (default 32)")
    parser.add_argument("--shard-mb", type=int, default=64,
                        help="max shard size of the saved checkpoints in MB (default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed loads with and without the value check (default 3)")
    args = parser.parse_args()

    import torch

    import dsv4
    from dsv4 import ModelConfig
    from dsv4.model.network import Transformer

    cfg = ModelConfig.from_preset(args.preset).replace(n_routed_experts=args.experts)
    torch.manual_seed(0)
    model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {args.preset} with {args.experts} experts, {n / 1e6:.1f}M parameters")
    shard = args.shard_mb * 10**6
    with tempfile.TemporaryDirectory() as tmp:
        native = dsv4.save(model, Path(tmp) / "native", max_shard_bytes=shard)
        official = dsv4.save(model, Path(tmp) / "official", format="official", dtype="fp8",
                             expert_dtype="fp4", max_shard_bytes=shard)
        hf = dsv4.save(model, Path(tmp) / "hf", format="hf", dtype="bf16",
                       max_shard_bytes=shard)
        del model
        rows = [
            ("native fp32", native, None, False),
            ("native -> bf16", native, "bf16", False),
            ("official FP8/FP4 -> bf16", official, None, False),
            ("official, kept FP8/FP4", official, None, True),
            ("hf bf16", hf, None, False),
        ]
        print(f"{'checkpoint':<28}{'model MiB':>12}{'peak growth MiB':>18}{'ratio':>8}"
              f"{'load s':>9}{'+ check s':>11}{'check cost':>12}")
        for label, path, dtype, quantized in rows:
            r = measure(path, dtype, quantized, args.repeats)
            print(f"{label:<28}{r['model_bytes'] / 2**20:>12.1f}"
                  f"{(r['peak'] - r['before']) / 2**20:>18.1f}{r['ratio']:>8.2f}"
                  f"{r['plain_s']:>9.2f}{r['verify_s']:>11.2f}"
                  f"{r['verify_s'] / r['plain_s'] - 1:>+12.0%}")


if __name__ == "__main__":
    main()
