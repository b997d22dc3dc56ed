"""RL rollout sampling: G samples per prompt fed once (`Engine.add_samples`) against G separate
requests, the way GRPO sampled before.

    python bench/rollouts.py --run runs/pt/sft-sort --domain sort     # any run with a tokenizer

Samples Q prompts x G completions of a built-in domain in record mode (log-probs, kept sets,
routing: what GRPO needs) both ways, with the same number of tokens per completion
(`ignore_eos`), and prints samples/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv4.posttrain.common import load_model_and_tokenizer, sample_rollouts  # noqa: E402
from dsv4.tasks import DOMAINS, prompt_ids  # noqa: E402


def separate_requests(model, prompts, params, group: int, max_batch: int) -> int:
    """The old way: every sample is its own request, prompt fed G times. Returns tokens."""
    engine = Engine(model, max_batch=max_batch, capacity=max(map(len, prompts))
                    + params.max_tokens + 1, record=True)
    for p in prompts:
        for _ in range(group):
            engine.add_request(p, params)
    tokens = 0
    with torch.no_grad():
        while engine.has_work():
            tokens += sum(e.token is not None for e in engine.step())
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a run directory with tokenizer.json")
    parser.add_argument("--domain", default="sort", choices=sorted(DOMAINS))
    parser.add_argument("--prompts", type=int, default=128, help="Q (default 128)")
    parser.add_argument("--group", type=int, default=8, help="G samples per prompt (default 8)")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.run)
    model.eval()
    domain = DOMAINS[args.domain]
    problems = domain.problems(args.prompts, seed=0)
    prompts = [prompt_ids(tokenizer, p.prompt, domain.thinking) for p in problems]
    params = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, ignore_eos=True)
    samples = args.prompts * args.group

    start = time.perf_counter()
    old_tokens = separate_requests(model, prompts, params, args.group, max_batch=128)
    t_old = time.perf_counter() - start
    start = time.perf_counter()
    rollouts = sample_rollouts(model, prompts, params, n=args.group)
    t_new = time.perf_counter() - start
    new_tokens = sum(len(r.completion) for r in rollouts)

    print(f"{args.run}: {args.domain}, {args.prompts} prompts x {args.group} samples, "
          f"{args.max_tokens} tokens each, record mode, {args.threads} threads")
    new_label = f"add_samples, {min(samples, 1024)} slots, one prefill per prompt"
    print(f"  {'separate requests, 128 slots':46s} {samples / t_old:7.1f} samples/s "
          f"({old_tokens} tokens)")
    print(f"  {new_label:46s} {samples / t_new:7.1f} samples/s ({new_tokens} tokens)  "
          f"{t_old / t_new:.2f}x")

if __name__ == "__main__":
    main()
