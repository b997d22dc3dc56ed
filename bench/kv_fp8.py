"""Accuracy impact of storing the KV cache in FP8 (non-RoPE dims, UE8M0 scales per 64 values).

    python bench/kv_fp8.py                    # nano preset, random init (std 0.02)
    python bench/kv_fp8.py --run runs/nano    # a model trained by `dsv4 train`, on its corpus

Feeds the same text through the cache twice (bf16 and FP8 storage, same chunks) and compares
next-token log-likelihood, top-1 agreement and the largest logit difference. Models trained
with `quant_sim` see no difference at all (their KV already lives on the FP8 grid).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsv4  # noqa: E402
from dsv4 import ModelConfig  # noqa: E402
from dsv4.inference.cache import KVCache  # noqa: E402
from dsv4.inference.engine import forward_step  # noqa: E402
from dsv4.model.network import Transformer, cast_model  # noqa: E402


def text_ids(tokenizer, length: int, vocab: int) -> torch.Tensor:
    """Real text (this repository's engine source) when a tokenizer is at hand, else random."""
    if tokenizer is None:
        return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    from dsv4.inference import engine

    text = inspect.getsource(engine) * 8
    ids = tokenizer.encode(text)[:length]
    return torch.tensor([ids])


def logits_through_cache(model, ids: torch.Tensor, kv_fp8: bool, chunk: int) -> torch.Tensor:
    cache = KVCache(model, slots=1, capacity=ids.shape[1] + 1, kv_fp8=kv_fp8)
    slot = torch.tensor([0])
    return torch.cat([forward_step(model, cache, slot, ids[:, s : s + chunk],
                                   all_logits=True)[0] for s in range(0, ids.shape[1], chunk)],
                     dim=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a run directory or checkpoint (default: random nano)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = None
    if args.run:
        from dsv4.text.tokenizer import Tokenizer
        from dsv4.weights.checkpoint import find_tokenizer

        model = dsv4.load(args.run, dtype=torch.bfloat16)
        path = find_tokenizer(args.run)
        tokenizer = Tokenizer.from_file(path) if path else None
    else:
        model = Transformer(ModelConfig.from_preset("nano"))
        model.init_weights(seed=0)
        model = cast_model(model, torch.bfloat16)
    model.eval()
    ids = text_ids(tokenizer, args.length, model.cfg.vocab_size)
    plain = logits_through_cache(model, ids, False, args.chunk)
    fp8 = logits_through_cache(model, ids, True, args.chunk)
    targets = ids[0, 1:]
    nll = [F.cross_entropy(x[:-1].float(), targets).item() for x in (plain, fp8)]
    agree = (plain.argmax(-1) == fp8.argmax(-1)).float().mean().item()
    cache = KVCache(model, slots=1, capacity=args.length)
    cache_fp8 = KVCache(model, slots=1, capacity=args.length, kv_fp8=True)
    label = args.run or "nano (random init)"
    print(f"{label}, {ids.shape[1]} tokens, chunks of {args.chunk}")
    print(f"  NLL/token   bf16 cache {nll[0]:.4f}   fp8 cache {nll[1]:.4f}   "
          f"delta {nll[1] - nll[0]:+.4f} nats")
    print(f"  top-1 agreement {agree:.2%}; max |logit diff| {(plain - fp8).abs().max().item():.4f}")
    mib = [c.bytes_by_kind() for c in (cache, cache_fp8)]
    print(f"  cache bytes (window + entries, one slot of {args.length}): "
          f"{(mib[0]['total'] - mib[0]['compressor_state']) / 2**20:.2f} MiB bf16 -> "
          f"{(mib[1]['total'] - mib[1]['compressor_state']) / 2**20:.2f} MiB fp8")


if __name__ == "__main__":
    main()
