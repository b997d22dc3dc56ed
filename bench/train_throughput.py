"""Training throughput of dsv4 vs transformers' DeepseekV4ForCausalLM, same config, same run.

Three training steps on the same [batch, seq] tokens, each forward + loss + backward +
optimizer step, in bf16 autocast on fp32 weights:
- dsv4 `dsv4 train` step: packed-document masking, MTP loss, sequence balance loss, indexer
  KL loss, gradient clipping, Muon + AdamW, loss-free bias update (everything the trainer does);
- dsv4 LM step: forward, cross-entropy, backward, AdamW (what the transformers step does);
- transformers: the same LM step on `DeepseekV4ForCausalLM` holding the same weights.
Prints tokens/s, the ratio (target: dsv4 >= 2x transformers) and MFU against this machine's
measured bf16 matmul peak; writes a bar chart. Not a test: timings depend on the machine.

    python bench/train_throughput.py                         # nano, batch 4 x 1024, CPU
    python bench/train_throughput.py --preset small --device cuda --seq 2048
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ModelConfig, Transformer  # noqa: E402
from dsv4.pretrain.optim import build_optimizer  # noqa: E402
from dsv4.pretrain.train import (  # noqa: E402
    ExpertLoad,
    learned_routing,
    measure_matmul_peak,
    mtp_inputs_and_targets,
    sequence_balance_loss,
    train_flops_per_token,
)
from tests.parity_utils import hf_model_from  # noqa: E402


def median_seconds(step, device: torch.device, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/out/throughput.png")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    ours = Transformer(cfg)
    hf = hf_model_from(ours).train().to(device)
    ours = ours.to(device).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    inputs, targets = ids[:, :-1].to(device), ids[:, 1:].to(device)
    doc_ids = torch.zeros_like(inputs)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    tokens = inputs.numel()

    muon = build_optimizer(ours, "muon", lr=1e-4, ns_dtype=torch.bfloat16)  # as dsv4 train
    adamw_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    adamw_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    load = ExpertLoad(ours, cfg.n_routed_experts, device)

    def dsv4_train_step() -> None:
        ours.set_indexer_mode("sparse")
        mtp_in, mtp_targets = mtp_inputs_and_targets(targets, pad_id=2)
        with autocast:
            (logits, mtp_logits), signals = ours(inputs, mtp_input_ids=mtp_in, doc_ids=doc_ids,
                                                 signals=True)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = loss + 0.3 * F.cross_entropy(mtp_logits.flatten(0, 1), mtp_targets.flatten())
        mask = torch.ones_like(inputs, dtype=torch.bool)
        routing = learned_routing(signals, cfg.n_hash_layers)
        for layer in routing:
            loss = loss + 1e-4 * sequence_balance_loss(*layer, mask, cfg.n_routed_experts)
        loss = loss + sum(signals.indexer_losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        muon.step()
        muon.zero_grad(set_to_none=True)
        load.reset()
        load.add(routing, mask)
        load.update_biases(1e-3)

    def dsv4_lm_step() -> None:
        ours.set_indexer_mode("sparse")
        with autocast:
            logits = ours(inputs)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        adamw_ours.step()
        adamw_ours.zero_grad(set_to_none=True)

    def hf_lm_step() -> None:
        with autocast:
            logits = hf(inputs).logits
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        adamw_hf.step()
        adamw_hf.zero_grad(set_to_none=True)

    peak = measure_matmul_peak(device, seconds=1.0)
    lm_cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    flops = {"dsv4 train step": train_flops_per_token(cfg, args.seq),
             "dsv4 LM step": train_flops_per_token(lm_cfg, args.seq),
             "transformers LM step": train_flops_per_token(lm_cfg, args.seq)}
    steps = {"dsv4 train step": dsv4_train_step, "dsv4 LM step": dsv4_lm_step,
             "transformers LM step": hf_lm_step}
    rates = {}
    print(f"{args.preset} batch={args.batch} seq={args.seq} {device} bf16 autocast; "
          f"measured bf16 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':24s}{'tokens/s':>10s}{'MFU':>8s}")
    for name, step in steps.items():
        rates[name] = tokens / median_seconds(step, device, args.repeats)
        print(f"{name:24s}{rates[name]:10.0f}{rates[name] * flops[name] / peak:8.1%}")
    hf_rate = rates["transformers LM step"]
    full = rates["dsv4 train step"] / hf_rate
    print(f"ratio vs transformers: LM step {rates['dsv4 LM step'] / hf_rate:.2f}x, full dsv4 "
          f"train step (MTP, balancing, indexer loss, Muon) {full:.2f}x (target >= 2x)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(rates), list(rates.values()), color=["C0", "C0", "C1"])
    ax.set_xlabel("training tokens / s")
    ax.set_title(f"{args.preset}, {args.batch} x {args.seq}, {device}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
