"""MTP self-speculative decoding: acceptance rate and speed against plain greedy decoding.

    python bench/speculative.py --run runs/nano        # a model trained by `dsv4 train`

Greedy-decodes a few prompts (one at a time, batch 1) with and without speculation, checks the
outputs are identical and prints tokens/s for both and the share of accepted MTP drafts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsv4  # noqa: E402
from dsv4.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv4.text.tokenizer import Tokenizer, byte_tokenizer  # noqa: E402
from dsv4.weights.checkpoint import find_tokenizer  # noqa: E402

PROMPTS = ["def ", "import os\n", "class Config:\n    def __init__(self", "for i in range("]


def timed_generate(engine: Engine, prompts: list[list[int]], params) -> tuple[list, float]:
    start = time.perf_counter()
    outputs = [engine.generate([p], params)[0] for p in prompts]
    return outputs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a run directory or checkpoint")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (default) keeps greedy outputs comparable token for token")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = dsv4.load(args.run, dtype=args.dtype).eval()
    path = find_tokenizer(args.run)
    tokenizer = Tokenizer.from_file(path) if path else byte_tokenizer()
    prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    plain, t_plain = timed_generate(Engine(model, max_batch=1, capacity=1024), prompts, params)
    spec_engine = Engine(model, max_batch=1, capacity=1024, speculative=True)
    spec, t_spec = timed_generate(spec_engine, prompts, params)
    n = sum(len(o) for o in plain)
    print(f"{args.run} ({args.dtype}, {args.threads} threads), {len(prompts)} prompts x "
          f"{args.max_tokens} greedy tokens")
    print(f"  plain greedy        {n / t_plain:7.1f} tokens/s")
    print(f"  MTP speculation     {n / t_spec:7.1f} tokens/s  ({t_plain / t_spec:.2f}x), "
          f"{spec_engine.acceptance_rate:.1%} of {spec_engine.drafts_proposed} drafts accepted")
    print(f"  identical outputs:  {plain == spec}")
    print(f"  sample: {tokenizer.decode(prompts[0][1:] + spec[0])!r}")


if __name__ == "__main__":
    main()
