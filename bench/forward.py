"""Forward and training-step throughput of dsv4 vs transformers' DeepseekV4ForCausalLM.

Same config, same weights, same inputs, in one run; prints tokens/s and the ratio, plus the
logit agreement of the two in the chosen dtype. Not a test: timings depend on the machine.

    python bench/forward.py --preset nano --seq 512 --batch 8
    python bench/forward.py --preset small --seq 2048 --batch 4 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ModelConfig, Transformer  # noqa: E402
from tests.parity_utils import hf_model_from  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bf16",
        help="bf16: autocast on fp32 weights (training-style)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    ours = Transformer(cfg)
    hf = hf_model_from(ours)
    ours, hf = ours.to(args.device), hf.to(args.device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    tokens = args.batch * args.seq
    autocast = torch.autocast(args.device, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def forward(model, logits_of):
        with torch.no_grad(), autocast:
            return logits_of(model(ids))

    def train_step(model, logits_of):
        with autocast:
            logits = logits_of(model(ids[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    runners = {"dsv4": (ours, lambda out: out), "transformers": (hf, lambda out: out.logits)}
    a = forward(*runners["dsv4"]).float()
    b = forward(*runners["transformers"]).float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{args.preset} batch={args.batch} seq={args.seq} {args.device} {args.dtype}")
    print(f"logits vs transformers: relative L2 diff {rel:.2e}, argmax agreement {agree:.4f}")
    print(f"{'':14s}{'forward tok/s':>16s}{'train step tok/s':>18s}")
    results = {}
    for name, runner in runners.items():
        fwd = tokens / timed(lambda r=runner: forward(*r), args.device, args.repeats)
        step = tokens / timed(lambda r=runner: train_step(*r), args.device, args.repeats)
        results[name] = (fwd, step)
        print(f"{name:14s}{fwd:16.0f}{step:18.0f}")
    ratio_fwd = results["dsv4"][0] / results["transformers"][0]
    ratio_step = results["dsv4"][1] / results["transformers"][1]
    print(f"{'ratio':14s}{ratio_fwd:15.2f}x{ratio_step:17.2f}x")


if __name__ == "__main__":
    main()
