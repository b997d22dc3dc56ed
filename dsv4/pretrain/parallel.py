"""Expert parallelism for `dsv4 train --expert-parallel` (torchrun), applied from the outside.

`model/network.py` stays a single-device definition; `expert_parallel(model, mesh)` swaps every MoE
layer's `RoutedExperts` (main layers and MTP block) for `ExpertParallelExperts`, which keeps
only this rank's E/N experts. The scheme is the simple exact one:

    all-gather the tokens, their routing indices and gate weights from every rank
    run this rank's experts on the gathered tokens routed to them (fp32 partial sums)
    sum the partial outputs over the ranks and keep this rank's own tokens

The expert stacks stay parameters named `ffn.experts.w1/w2/w3`, now DTensors sharded on the
expert dim (`Shard(0)`) on the data-parallel mesh: the same layout FSDP2 gives them, so Muon
orthogonalizes each local expert matrix on its own, `clip_grad_norm_` sees one kind of
parameter, and `get_model_state_dict(full_state_dict=True)` gathers them for a checkpoint.
The difference from FSDP: they are never gathered; the tokens travel instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv4.model.network import MoE, RoutedExperts, act_quant, swiglu

EXPERT_WEIGHTS = ("w1", "w2", "w3")


# ---------------------------------------------------------------------------------------------
# Collectives over rows, with autograd
# ---------------------------------------------------------------------------------------------


def row_counts(rows: int, group: Any, device: torch.device) -> list[int]:
    """Rows on every rank (they may differ, e.g. a short last validation batch). On `device`:
    NCCL only moves CUDA tensors."""
    counts = [torch.zeros(1, dtype=torch.long, device=device)
              for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device), group=group)
    return [int(c) for c in counts]


def gather_rows(x: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's rows, rank order (padded to the longest for the collective)."""
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def own_rows(x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return x[start : start + counts[rank]]


class GatherRows(torch.autograd.Function):
    """Forward: every rank's rows. Backward: each rank's gradient covers all rows (its
    experts saw all tokens), so the rows' gradient is their sum over the ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
        ctx.counts, ctx.group = counts, group
        return gather_rows(x, counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return own_rows(grad, ctx.counts, dist.get_rank(ctx.group)), None, None


class SumOwnRows(torch.autograd.Function):
    """Forward: the sum over the ranks of the partial outputs, this rank's rows (a
    reduce-scatter; an all-reduce plus a slice works on every backend with uneven rows).
    Backward: every rank's partial output fed every rank's rows: all-gather the gradients."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
        ctx.counts, ctx.group = counts, group
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return own_rows(total, counts, dist.get_rank(group)).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_rows(grad.contiguous(), ctx.counts, ctx.group), None, None


class ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient x factor. The trainer backpropagates world x its loss (FSDP
    averages gradients over the ranks); an expert's gradient already sums over every rank's
    tokens and is never averaged, so it takes 1/world here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


# ---------------------------------------------------------------------------------------------
# The expert-parallel experts
# ---------------------------------------------------------------------------------------------


def local_expert_output(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, first: int,
                        limit: float, quant_sim: bool) -> torch.Tensor:
    """fp32 [T, dim]: the weighted outputs of experts first .. first + len(w1) - 1 only, with
    `RoutedExperts.forward`'s numerics (tokens grouped by expert, in token order)."""
    k = indices.shape[1]
    local = indices.flatten() - first
    slots = ((local >= 0) & (local < w1.shape[0])).nonzero().squeeze(1)
    slots = slots[local[slots].argsort(stable=True)]  # grouped by expert, token order kept
    counts = torch.bincount(local[slots], minlength=w1.shape[0]).tolist()
    token_of = slots // k
    routed_w = weights.flatten()[slots].float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        xe = act_quant(x[rows]) if quant_sim else x[rows]
        h = swiglu(F.linear(xe, w1[e].to(x.dtype)), F.linear(xe, w3[e].to(x.dtype)), limit)
        h = h * routed_w[start : start + count, None]
        h = act_quant(h.to(x.dtype)) if quant_sim else h.to(x.dtype)
        out.index_add_(0, rows, F.linear(h, w2[e].to(x.dtype)).float())
        start += count
    return out


class ExpertParallelExperts(nn.Module):
    """Drop-in for `RoutedExperts` holding experts [rank * E/N, (rank + 1) * E/N) of E."""

    def __init__(self, experts: RoutedExperts, mesh: Any):
        from torch.distributed.tensor import DTensor, Shard

        super().__init__()
        world, rank = mesh.size(), mesh.get_local_rank()
        n_experts = experts.w1.shape[0]
        if n_experts % world:
            raise ValueError(f"--expert-parallel: n_routed_experts={n_experts} is not "
                             f"divisible by the {world} processes")
        self.limit, self.quant_sim = experts.limit, experts.quant_sim
        self.group, self.world = mesh.get_group(), world
        self.per_rank = n_experts // world
        self.first = rank * self.per_rank
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name).detach()
            mine = full[self.first : self.first + self.per_rank].clone()
            sharded = DTensor.from_local(mine, mesh, [Shard(0)], run_check=False,
                                         shape=full.shape, stride=full.stride())
            setattr(self, name, nn.Parameter(sharded))

    def forward(self, x: torch.Tensor, indices: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [T, dim], indices / weights [T, k] of this rank -> [T, dim] like RoutedExperts."""
        counts = row_counts(x.shape[0], self.group, x.device)
        all_x = GatherRows.apply(x, counts, self.group)
        all_w = GatherRows.apply(weights, counts, self.group)
        all_indices = gather_rows(indices, counts, self.group)
        w1, w2, w3 = (ScaleGrad.apply(getattr(self, n).to_local(), 1.0 / self.world)
                      for n in EXPERT_WEIGHTS)
        partial = local_expert_output(all_x, all_indices, all_w, w1, w2, w3, self.first,
                                      self.limit, self.quant_sim)
        return SumOwnRows.apply(partial, counts, self.group).to(x.dtype)


def expert_parallel(model: nn.Module, mesh: Any) -> set[nn.Parameter]:
    """Swap every MoE layer's experts for this rank's share; returns the expert parameters,
    which FSDP must leave alone (`fully_shard(..., ignored_params=...)`)."""
    ignored: set[nn.Parameter] = set()
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, RoutedExperts):
            module.experts = ExpertParallelExperts(module.experts, mesh)
            ignored.update(getattr(module.experts, n) for n in EXPERT_WEIGHTS)
    return ignored
