"""Muon + AdamW, the way DeepSeek-V4 trains (V4 report §3.4.1).

Algorithm 1 of the paper, for every logically independent matrix W [n, m]:

    M_t = mu * M_{t-1} + G_t                        plain sum, not an EMA
    O'  = HybridNewtonSchulz(mu * M_t + G_t)         Nesterov look-ahead
    O   = O' * sqrt(max(n, m)) * gamma               update RMS = gamma = 0.18
    W_t = W_{t-1} * (1 - lr * wd) - lr * O           decoupled weight decay

AdamW (betas 0.9/0.95, eps 1e-20, wd 0.1) takes the embedding, the head, every norm weight, the
mHC static biases and gating factors, the attention sinks and the compressors' positional biases
(`ape`); Muon takes every other matrix. Both kinds live in ONE optimizer (`Muon`, one param group
per kind and layout, each with "lr" and "base_lr") so one LR schedule scales them all and one
`state_dict()` resumes them all.

Decisions the report leaves open (each tested):
- What is one matrix: a stacked expert tensor [E, out, in] is E matrices (V4 report §3.4.1); the
  grouped output projection `wo_a` [g*r, in] is g matrices [r, in]; an mHC generator `hc_*_fn`
  [(2+n)*n, n*d] is three, W_pre [n, n*d], W_post [n, n*d] and W_res [n*n, n*d], in the row order
  the model slices them (`HyperConnection.pre`). `hc_head_fn` [n, n*d] is one.
- `ape` [ratio, width] is a bias added to the compressor's gate logits, not a map between spaces,
  so it goes to AdamW (the report does not say).
- Weight decay 0.1 applies to every Muon matrix and to the AdamW embedding and head; the 1-D
  gains, biases, gates, sinks and `ape` get no decay (decaying a norm gain or an mHC gate toward 0
  fights its meaning; Megatron and nanoGPT do the same). `decay_vectors=True` decays them too.
- Parameters with requires_grad=False (the MoE balancing bias `ffn.gate.bias`, updated by the
  training loop's sign rule) are in no group.

FSDP2: parameters and gradients may be DTensors. Element-wise work runs on the local shards; a
matrix that a shard cuts through is gathered (`full_tensor()`), orthogonalized identically on
every rank, and each rank keeps its own shard of the result. A stacked expert tensor sharded on
dim 0 holds whole expert matrices on every rank, so it is orthogonalized locally, no gather.
(DeepSeek's knapsack assignment of whole matrices to ranks, in the V4 report, would remove the
redundant work; at our sizes it is not worth the machinery.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

# Hybrid Newton-Schulz schedule (V4 report §3.4.1): 8 fast steps, then 2 that pin singular values
# to 1.
NS_FAST = (3.4445, -4.7750, 2.0315)
NS_POLISH = (2.0, -1.5, 0.5)
NS_FAST_STEPS = 8
NS_POLISH_STEPS = 2

MUON_MOMENTUM = 0.95
MUON_RMS = 0.18
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-20
WEIGHT_DECAY = 0.1
DEFAULT_LR = 2e-3  # a working value for the nano/small presets; the paper's 2.7e-4 is for 284B


# ---------------------------------------------------------------------------------------------
# Newton-Schulz orthogonalization
# ---------------------------------------------------------------------------------------------


def newton_schulz(g: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """U V^T of g = U S V^T, approximately, for every matrix in g: [..., m, n] -> same shape.

    Hybrid schedule of DeepSeek-V4: 8 steps of (3.4445, -4.7750, 2.0315) grow the small singular
    values fast (they land in [0.68, 1.13]); 2 steps of (2, -1.5, 0.5), whose polynomial has
    p(1) = 1 and p'(1) = 0, pin them to 1 (within [1, 1.0005] for every singular value above
    1e-3 of the Frobenius norm). Leading dims are a batch: each matrix is its own problem.
    `dtype`: the matmul dtype (bf16 is stable, V4 report §3.4.1); default g's dtype. The result
    has g's dtype.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix [..., m, n], got shape {tuple(g.shape)}")
    x = g.to(dtype or g.dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation so the Gram matrix X X^T is the small side
        x = x.mT
    # Frobenius-normalize each matrix so every singular value is <= 1 (eps: all-zero matrices).
    wide = x.to(torch.promote_types(x.dtype, torch.float32))  # the norm in >= fp32
    x = (wide / (torch.linalg.matrix_norm(wide, keepdim=True) + 1e-7)).to(x.dtype)
    for step in range(NS_FAST_STEPS + NS_POLISH_STEPS):
        a, b, c = NS_FAST if step < NS_FAST_STEPS else NS_POLISH
        gram = x @ x.mT  # [..., m, m]
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def orthogonalize(update: Tensor, row_blocks: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """The Muon direction NS(update) * sqrt(max(n, m)) of every logical [n, m] matrix.

    update: [rows, cols] (one matrix, or `row_blocks` stacked along the rows) or
    [E, rows, cols] (E independent matrices, e.g. experts). Returns the same shape, each logical
    matrix with RMS ~1 (the optimizer multiplies by gamma = 0.18).
    """
    return orthogonalize_many([update], [row_blocks], [dtype])[0]


# ---------------------------------------------------------------------------------------------
# DTensor helpers (FSDP2): plain tensors pass through
# ---------------------------------------------------------------------------------------------


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage, in-place ops update it); t otherwise."""
    return t.to_local() if _is_dtensor(t) else t


def _gather_for_ns(look: Tensor) -> tuple[Tensor, Any]:
    """(the tensor to orthogonalize, a function from its update to this rank's local update).

    Plain tensor: itself. DTensor whose shards hold whole matrices (an [E, out, in] stack
    sharded on E): the local shard, no communication. Any other DTensor: the full tensor
    (all-gather); every rank orthogonalizes it and keeps its own slice.
    """
    if not _is_dtensor(look):
        return look, None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if look.ndim == 3 and all(isinstance(p, Replicate) or isinstance(p, Shard) and p.dim == 0
                              for p in look.placements):
        return look.to_local(), None
    mesh, placements = look.device_mesh, look.placements

    def local_slice(full_update: Tensor) -> Tensor:  # Replicate -> Shard is a local slice
        replicated = DTensor.from_local(full_update, mesh, [Replicate()] * mesh.ndim,
                                        run_check=False)
        return replicated.redistribute(mesh, placements).to_local()

    return look.full_tensor(), local_slice


def _logical_matrices(t: Tensor, row_blocks: tuple[int, ...] | None) -> list[Tensor]:
    """The logical matrices of a 2-D or 3-D tensor as [k, rows, cols] stacks (views)."""
    if t.ndim == 3:
        return [t]
    if row_blocks is None:
        return [t.unsqueeze(0)]
    if sum(row_blocks) != t.shape[0]:
        raise ValueError(f"row blocks {row_blocks} do not add up to the {t.shape[0]} rows "
                         f"of a {tuple(t.shape)} matrix")
    if len(set(row_blocks)) == 1:
        return [t.view(len(row_blocks), row_blocks[0], t.shape[1])]
    return [block.unsqueeze(0) for block in t.split(list(row_blocks), dim=0)]


def orthogonalize_many(tensors: list[Tensor], row_blocks: list[tuple[int, ...] | None],
                       dtypes: list[torch.dtype | None]) -> list[Tensor]:
    """`orthogonalize` for many tensors at once: logical matrices of the same shape (tall ones
    transposed to wide first, so [E, 256, 128] joins [E, 128, 256]) go through ONE batched
    Newton-Schulz call ("batched NS"). Same results as one call per tensor, up to
    matmul rounding."""
    pieces = [_logical_matrices(t, blocks) for t, blocks in zip(tensors, row_blocks)]
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    for i, (stacks, dtype) in enumerate(zip(pieces, dtypes)):
        for j, stack in enumerate(stacks):
            if stack.shape[0] == 0:
                continue
            rows, cols = stack.shape[-2:]
            key = (min(rows, cols), max(rows, cols), stack.dtype, stack.device, dtype)
            buckets.setdefault(key, []).append((i, j))
    results: list[list[Tensor | None]] = [[None] * len(stacks) for stacks in pieces]
    for (_, longest, *_, dtype), members in buckets.items():
        wide = [pieces[i][j] if pieces[i][j].shape[-2] <= pieces[i][j].shape[-1]
                else pieces[i][j].mT for i, j in members]
        ortho = newton_schulz(torch.cat(wide), dtype) * math.sqrt(longest)
        for (i, j), part in zip(members, ortho.split([w.shape[0] for w in wide])):
            tall = pieces[i][j].shape[-2] > pieces[i][j].shape[-1]
            results[i][j] = part.mT if tall else part
    out = []
    for t, stacks, done in zip(tensors, pieces, results):
        done = [d if d is not None else s.clone() for s, d in zip(stacks, done)]  # empty stacks
        out.append(done[0].reshape(t.shape) if len(done) == 1
                   else torch.cat([d.squeeze(0) for d in done]).reshape(t.shape))
    return out


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


class Muon(torch.optim.Optimizer):
    """Muon for matrices and AdamW for the rest, in one optimizer.

    Every param group has `algorithm` "muon" or "adamw". Muon groups: `momentum` (0.95, a plain
    sum), `nesterov` (True), `rms_scale` (0.18), `row_blocks` (None, or the row counts of the
    logical matrices stacked in each 2-D param of the group; 3-D params are always one matrix
    per leading index), `ns_dtype` (None: bf16 on CUDA, fp32 elsewhere). AdamW groups: `betas`
    (0.9, 0.95), `eps` (1e-20). Both: `lr`, `base_lr` (what an LR schedule multiplies),
    `weight_decay` (decoupled: W <- W * (1 - lr * wd)).
    """

    def __init__(self, params: Iterable[Any], lr: float = DEFAULT_LR,
                 weight_decay: float = WEIGHT_DECAY, momentum: float = MUON_MOMENTUM,
                 nesterov: bool = True, rms_scale: float = MUON_RMS,
                 betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS,
                 ns_dtype: torch.dtype | None = None) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr}: must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}: must be in [0, 1)")
        defaults = dict(lr=lr, weight_decay=weight_decay, algorithm="muon",
                        momentum=momentum, nesterov=nesterov, rms_scale=rms_scale,
                        row_blocks=None, ns_dtype=ns_dtype, betas=tuple(betas), eps=eps)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])  # what an LR schedule multiplies
        if group["algorithm"] not in ("muon", "adamw"):
            raise ValueError(f"param group algorithm={group['algorithm']!r}: "
                             "must be 'muon' or 'adamw'")
        if group["algorithm"] == "muon":
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon needs 2-D or 3-D parameters, got shape "
                                     f"{tuple(p.shape)} (put it in an 'adamw' group)")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([g for g in self.param_groups if g["algorithm"] == "muon"])
        for group in self.param_groups:
            if group["algorithm"] == "adamw":
                self._adamw_group(group)
        return loss

    def _muon_step(self, groups: list[dict]) -> None:
        """Algorithm 1 for every Muon parameter; all their NS problems batched by shape."""
        params, groups_of, looks, finishers = [], [], [], []
        for group in groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:  # fp32 at least, even for bf16 params
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=_master(p.dtype))
                grad = _local(p.grad).to(_master(p.dtype))
                buf = _local(state["momentum_buffer"])
                buf.mul_(mu).add_(grad)  # M_t = mu * M_{t-1} + G_t
                look = grad.add(buf, alpha=mu) if group["nesterov"] else buf.clone()
                if _is_dtensor(p.grad):  # re-wrap the local look-ahead with the grad's layout
                    from torch.distributed.tensor import DTensor

                    look = DTensor.from_local(look, p.grad.device_mesh, p.grad.placements,
                                              shape=p.grad.shape, stride=p.grad.stride(),
                                              run_check=False)
                look, finish = _gather_for_ns(look)
                params.append(p)
                groups_of.append(group)
                looks.append(look)
                finishers.append(finish)
        dtypes = [g["ns_dtype"] or (torch.bfloat16 if p.is_cuda else torch.float32)
                  for p, g in zip(params, groups_of)]
        updates = orthogonalize_many(looks, [_row_blocks(g) for g in groups_of], dtypes)
        for p, group, update, finish in zip(params, groups_of, updates, finishers):
            if finish is not None:
                update = finish(update)
            weight = _local(p)
            weight.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
            weight.add_(update.to(weight.dtype), alpha=-group["lr"] * group["rms_scale"])

    def _adamw_group(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=_master(p.dtype))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_master(p.dtype))
            state["step"] += 1
            t = state["step"]
            grad = _local(p.grad).to(_master(p.dtype))
            exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # torch.optim.AdamW's arrangement of the bias corrections and eps
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            weight = _local(p)
            weight.mul_(1 - lr * wd)
            weight.addcdiv_(exp_avg.to(weight.dtype), denom.to(weight.dtype),
                            value=-lr / (1 - beta1**t))


def _master(dtype: torch.dtype) -> torch.dtype:
    """Optimizer-state dtype: fp32, or the parameter's own dtype when that is wider."""
    return torch.promote_types(dtype, torch.float32)


def _row_blocks(group: dict) -> tuple[int, ...] | None:
    blocks = group["row_blocks"]
    return tuple(blocks) if blocks is not None else None  # a list after a JSON round trip


# ---------------------------------------------------------------------------------------------
# Which parameter gets which optimizer (V4 report, Muon: AdamW for embeddings, head, norms)
# ---------------------------------------------------------------------------------------------

ADAMW_MATRICES = ("embed", "head")  # modules whose weight matrix goes to AdamW, with decay


def _path(name: str) -> list[str]:
    return name.split(".")


def is_adamw_matrix(name: str) -> bool:
    """The embedding and the output head: matrices the report gives to AdamW."""
    parts = _path(name)
    return len(parts) >= 2 and parts[-2] in ADAMW_MATRICES and parts[-1] == "weight"


def is_adamw_vector(name: str, param: Tensor) -> bool:
    """Gains, biases and gates: every 1-D tensor (norm weights, mHC `*_base` / `*_scale`,
    `attn_sink`) plus the compressors' positional bias `ape`."""
    parts = _path(name)
    is_norm = len(parts) >= 2 and parts[-2].endswith("norm")
    return param.ndim < 2 or is_norm or parts[-1] in ("ape", "attn_sink") or (
        parts[-1].startswith("hc_") and parts[-1].endswith(("_base", "_scale")))


def is_adamw_param(name: str, param: Tensor) -> bool:
    """True for what the report gives AdamW, False for the matrices that Muon takes."""
    return is_adamw_matrix(name) or is_adamw_vector(name, param)


def matrix_row_blocks(name: str, shape: tuple[int, ...], model_config: Any = None
                      ) -> tuple[int, ...] | None:
    """Row counts of the logical matrices stacked in a 2-D Muon parameter (None: one matrix).

    `hc_{attn,ffn}_fn` [(2+n)*n, n*d] -> (n, n, n*n): W_pre, W_post, W_res.
    `attn.wo_a.weight` [g*r, in] -> (r,) * g: one matrix per output group (needs the config).
    """
    if len(shape) != 2:
        return None  # 3-D stacks are one matrix per leading index anyway
    leaf = _path(name)[-1]
    n = model_config.hc_mult if model_config is not None else 4
    if leaf.startswith("hc_") and leaf.endswith("_fn") and shape[0] == (2 + n) * n:
        return (n, n, n * n)  # hc_head_fn [n, n*d] is one matrix
    if name.endswith("attn.wo_a.weight") and model_config is not None:
        groups = model_config.o_groups
        if groups > 1 and shape[0] % groups == 0:
            return (shape[0] // groups,) * groups
    return None


def _named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name, param


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon parameters, AdamW parameters) of a dsv4 Transformer, trainable ones only."""
    muon, adamw = [], []
    for name, param in _named_trainable(model):
        (adamw if is_adamw_param(name, param) else muon).append(param)
    return muon, adamw


def param_groups(model: nn.Module, optimizer: str = "muon", lr: float = DEFAULT_LR,
                 weight_decay: float = WEIGHT_DECAY, decay_vectors: bool = False
                 ) -> list[dict]:
    """Param groups, each with a "name" and the "param_names" it holds:
    "muon" (plain matrices, expert stacks), "muon_hc_fn" and "muon_wo_a" (matrices stacked
    along the rows, with their "row_blocks"), "adamw" (embedding and head, decayed),
    "adamw_vectors" (norms, mHC biases/scales, sinks, `ape`; decayed only with `decay_vectors`).
    optimizer "adamw": every matrix goes to the decayed "adamw" group instead."""
    model_config = getattr(model, "cfg", None)
    groups: dict[tuple, dict] = {}
    for name, param in _named_trainable(model):
        if is_adamw_vector(name, param):
            key, options = ("adamw_vectors",), dict(
                algorithm="adamw", weight_decay=weight_decay if decay_vectors else 0.0)
        elif optimizer == "adamw" or is_adamw_matrix(name):
            key, options = ("adamw",), dict(algorithm="adamw", weight_decay=weight_decay)
        else:
            blocks = matrix_row_blocks(name, tuple(param.shape), model_config)
            label = ("muon" if blocks is None
                     else "muon_hc_fn" if _path(name)[-1].startswith("hc_") else "muon_wo_a")
            key, options = (label, blocks), dict(algorithm="muon", weight_decay=weight_decay,
                                                 row_blocks=blocks)
        group = groups.setdefault(key, dict(name=key[0], params=[], param_names=[], lr=lr,
                                            base_lr=lr, **options))
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, name: str = "muon", lr: float = DEFAULT_LR,
                    weight_decay: float = WEIGHT_DECAY, decay_vectors: bool = False,
                    ns_dtype: torch.dtype | None = None) -> Muon:
    """The training optimizer: "muon" (Muon for matrices + AdamW for the rest) or
    "adamw" (AdamW for everything, the baseline). One object; every group has "lr", "base_lr"
    and "name"; an LR schedule sets group["lr"] = group["base_lr"] * factor."""
    if name not in ("muon", "adamw"):
        raise ValueError(f"optimizer {name!r}: must be 'muon' or 'adamw'")
    groups = param_groups(model, name, lr, weight_decay, decay_vectors)
    return Muon(groups, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)


def warmup_cosine(step: int, warmup: int, decay_start: int, floor_step: int,
                  floor: float) -> float:
    """The LR multiplier at optimizer step `step` (0-based): linear warm-up over `warmup`
    steps, 1 until `decay_start`, a cosine down to `floor` at `floor_step`, then `floor`.
    Pre-training and every post-training stage use it."""
    if step < warmup:
        return (step + 1) / warmup
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, floor_step - decay_start))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
