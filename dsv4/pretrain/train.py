"""Pretraining, the V4 way (V4 report, pre-training), in one process or under torchrun.

One optimizer step:

    for each micro-batch (gradient accumulation):
        packed batch (documents aligned to 128, no cross-document attention)
        bf16 autocast forward -> logits, MTP logits, router scores, indexer KL losses
        loss = CE + mtp_weight * CE_mtp + 1e-4 * sequence balance loss + indexer KL
        backward
    clip the gradient norm (1.0), LR schedule, optimizer step (Muon + AdamW, dsv4/pretrain/optim.py)
    loss-free balancing: gate bias += 0.001 * sign(mean load - load) on the non-hash layers

Schedules (all step counts are fixed when a run is created, in `train_config.json`):
- LR: linear warm-up, constant, then cosine decay to `min_lr_ratio` (0.1) x peak, the shape of
  the report's schedule. Steps past the planned end (`--resume --steps` beyond the original
  plan) stay at the floor, so extending a run never re-warms it.
- MTP loss weight 0.3, then 0.1 from the step where the LR decay starts (the V4 report's).
- Lightning Indexer (our reading of V3.2's recipe, see `Attention.compressed`): for
  the first `dense_fraction` of the steps CSA layers attend every visible compressed entry
  (dense warm-up) while the indexer learns, from a KL loss toward the main attention's
  distribution over those entries, which entries matter; afterwards CSA attends only the
  indexer's top-k (sparse) and the indexer keeps learning from the KL restricted to the top-k.
  The indexer's inputs are detached: the LM loss never trains it and its loss trains nothing
  else. Sparse top-k is active at the end of every run whose dense_fraction < 1.

A run directory holds `config.json` (model), `train_config.json`, `tokenizer.json` (a byte-level
BPE trained on the corpus), `metrics.jsonl` (one JSON object per logged step), `loss.png`, and
`checkpoints/step_NNNNNN/` (a native checkpoint `dsv4.load` reads, plus `trainer.pt`: optimizer,
data position, RNG, step) with `checkpoints/latest` naming the newest complete one. A checkpoint
becomes `latest` only after all its files are written, so a kill never corrupts the latest one.
`--resume` continues exactly: on CPU the resumed losses equal the uninterrupted run's.

Distributed (`torchrun --nproc_per_node N -m dsv4 train ...`): data parallel with FSDP2
(`fully_shard` per block, see `parallelize`), Muon on the sharded parameters, the loss
normalized by the global token count so N processes compute the single-process gradient.
`--expert-parallel` additionally splits the routed experts over the processes (each keeps E/N;
the tokens travel to them, dsv4/pretrain/parallel.py); checkpoints stay full native ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsv4.errors import Error
from dsv4.files import (
    FolderLock,
    FolderLocked,
    append_line,
    atomic_write,
    remove_temp_leftovers,
    write_json_atomic,
    write_text_atomic,
)
from dsv4.model.config import PRESETS, ModelConfig
from dsv4.model.network import MoE, Routing, Signals, Transformer, rebuild_rope_tables
from dsv4.options import option
from dsv4.pretrain.optim import warmup_cosine
from dsv4.runtime import bf16_autocast, set_threads

IGNORE_INDEX = -100
TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
TRAINER_STATE_NAME = "trainer.pt"
SAMPLE_PROMPTS = ("def ", "import ", "class ")


class TrainingError(Error, RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a run needs besides the model config. Saved as `train_config.json`."""

    # The help texts are also `dsv4 train --help` (dsv4.options); steps left at None are
    # filled from `steps` by plan().
    out: str = option("runs/nano", "run directory", metavar="DIR", default_text="runs/<preset>")
    preset: str | None = option("nano", "model preset: " + ", ".join(PRESETS), metavar="NAME")
    config_path: str | None = option(None, "a model config.json (any dialect) instead of a preset",
                                     metavar="PATH", default_text="none")
    data: list[str] | None = option(
        None, "text / .jsonl / .json / .parquet files or folders", metavar="PATH",
        default_text="the Python standard library source of this interpreter")
    steps: int | None = option(200, "total optimizer steps of the run; with --resume, the step "
                               "to continue to", positive=True, metavar="N")  # None: the run's
    batch_size: int = option(4, "sequences per optimizer step, all processes together",
                             positive=True, metavar="N")
    micro_batch: int | None = option(
        None, "sequences per forward pass per process; smaller than the batch means gradient "
        "accumulation", positive=True, metavar="N", default_text="the whole batch")
    seq_len: int = option(1024, "tokens per sequence, a multiple of 128", positive=True,
                          metavar="N")
    optimizer: str = option("muon", "muon: Muon for matrices + AdamW for embeddings, head, "
                            "norms and mHC gates (the paper); adamw: AdamW for everything",
                            choices=("muon", "adamw"))
    lr: float = option(2e-3, "peak learning rate, shared by Muon and AdamW (the paper's 2.7e-4 "
                       "is for 284B parameters)")
    weight_decay: float = option(0.1, "decoupled weight decay")
    clip: float = option(1.0, "gradient-norm clipping (V3 used 1.0)")
    warmup_steps: int | None = option(None, "linear LR warm-up steps", metavar="N",
                                      default_text="5% of --steps")
    decay_start_step: int | None = option(None, "first step of the cosine LR decay",
                                          default_text="70% of the steps")
    decay_end_step: int | None = option(None, "step where the decay reaches min_lr_ratio",
                                        default_text="the last step")
    min_lr_ratio: float = option(0.1, "cosine decay to this x peak")
    mtp_weight: float = option(0.3, "MTP loss weight, then mtp_weight_decay once the LR decay "
                               "starts")
    mtp_weight_decay: float = option(0.1, "MTP loss weight during the LR decay")
    balance_loss_weight: float = option(1e-4, "sequence-wise balance loss (V3 report)")
    bias_update_speed: float = option(1e-3, "loss-free balancing (V3 report)")
    indexer_loss_weight: float = option(1.0, "Lightning Indexer distillation loss weight")
    dense_fraction: float = option(
        0.5, "share of the steps in which CSA layers attend every compressed entry while the "
        "indexer warms up; sparse top-k afterwards", metavar="F")
    sparse_start_step: int | None = option(None, "first sparse step",
                                           default_text="dense_fraction x steps")
    val_fraction: float = option(0.01, "share of the corpus held out for validation")
    eval_every: int = option(50, "validation loss every N steps", positive=True, metavar="N")
    eval_batches: int = option(4, "batches per validation")
    save_every: int = option(100, "checkpoint every N steps, and at the end", positive=True,
                             metavar="N")
    keep_checkpoints: int = option(2, "checkpoints kept in the run directory")
    log_every: int = option(1, "metrics line every N steps")
    seed: int = option(0, "weights, data order and samples")
    device: str = option("auto", "auto (CUDA if available), cpu, cuda, cuda:1, ...")
    threads: int | None = option(
        None, "CPU threads for torch (1 is much faster on a machine busy with other work)",
        positive=True, metavar="N", default_text="torch's choice, the core count")
    autocast: str = option("bf16", '"bf16" or "fp32" (no autocast)')
    cache_dir: str | None = option(None, "where the corpus tokenizer and token shards are "
                                   "cached", metavar="DIR",
                                   default_text="$DSV4_CACHE or ~/.cache/dsv4")
    samples: int = option(3, "samples printed at the end, 0 for none", metavar="N")
    sample_tokens: int = option(48, "tokens per sample")
    progress: bool = option(True, "no progress bars")
    expert_parallel: bool = option(  # pretrain/parallel.py
        False, "under torchrun: split every MoE layer's routed experts over the processes "
        "(each keeps n_routed_experts / N, which must divide); tokens are exchanged instead of "
        "expert weights, everything else stays FSDP2. A run setting, kept on --resume. One "
        "process: no effect")
    model_config: dict[str, Any] | None = field(default=None, repr=False)

    def plan(self) -> None:
        """Fill the schedule steps left at None from `steps`, and check every value."""
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.steps))
        if self.decay_start_step is None:
            self.decay_start_step = round(0.7 * self.steps)
        if self.decay_end_step is None:
            self.decay_end_step = self.steps
        if self.sparse_start_step is None:
            self.sparse_start_step = round(self.dense_fraction * self.steps)
        self.check()

    def check(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise TrainingError(f"{name}={getattr(self, name)!r}: {msg}")

        for name in ("steps", "batch_size", "seq_len", "eval_every", "save_every", "log_every",
                     "keep_checkpoints", "sample_tokens"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "must be a positive integer")
        need(self.micro_batch is None or self.micro_batch >= 1, "micro_batch",
             "must be a positive integer")
        need(self.optimizer in ("muon", "adamw"), "optimizer", "must be 'muon' or 'adamw'")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(0 < self.min_lr_ratio <= 1, "min_lr_ratio", "must be in (0, 1]")
        need(0 <= self.dense_fraction <= 1, "dense_fraction", "must be in [0, 1]")
        need(self.autocast in ("bf16", "fp32"), "autocast", "must be 'bf16' or 'fp32'")
        need(0 <= self.warmup_steps <= self.decay_start_step <= self.decay_end_step,
             "decay_start_step", "need warmup_steps <= decay_start_step <= decay_end_step")
        need(self.seq_len % 128 == 0, "seq_len",
             "must be a multiple of 128 (documents are aligned to the HCA block)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Schedules: LR, indexer warm-up, MTP weight
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warm-up, constant,
    cosine to min_lr_ratio between decay_start_step and decay_end_step, then the floor."""
    return warmup_cosine(step, tc.warmup_steps, tc.decay_start_step, tc.decay_end_step - 1,
                         floor=tc.min_lr_ratio)


def mtp_weight(step: int, tc: TrainConfig) -> float:
    return tc.mtp_weight if step < tc.decay_start_step else tc.mtp_weight_decay


def indexer_mode(step: int, tc: TrainConfig) -> str:
    return "dense" if step < tc.sparse_start_step else "sparse"


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def mtp_inputs_and_targets(
    targets: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP block's inputs (token t+1) and targets (token t+2) of a packed batch.

    targets [B, S] (-100 = none). Position t predicts t+2 only if t+1 is in t's document
    (targets[t] set) and t+2 is too (targets[t+1] set); the input at t is token t+1 (pad where
    there is none, a valid id whose prediction is ignored)."""
    inputs = torch.where(targets == IGNORE_INDEX, pad_id, targets)
    two_ahead = F.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)
    return inputs, torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, two_ahead)


def sequence_balance_loss(
    indices: torch.Tensor, scores: torch.Tensor, token_mask: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """Sequence-wise balance loss sum_i f_i P_i (DeepSeek-V3 report), averaged over the rows.

    indices [B*S, k] chosen experts; scores [B*S, E] affinities (with grad); token_mask [B, S]
    real (non-pad) tokens. f_i = E/(k T) * #tokens routed to i, P_i = mean_t s_{i,t}/sum_j s_{j,t},
    both over the T real tokens of one packed row. Returns the mean over rows (0 if none)."""
    batch, length = token_mask.shape
    k = indices.shape[-1]
    mask = token_mask.reshape(batch, length, 1).float()
    chosen = F.one_hot(indices.reshape(batch, length, k), n_experts).sum(2).float()  # [B,S,E]
    tokens = mask.sum(dim=1).clamp_min(1)  # [B, 1]
    f = (chosen * mask).sum(dim=1) * n_experts / (k * tokens)  # [B, E]
    normalized = scores.reshape(batch, length, n_experts).float()
    normalized = normalized / normalized.sum(-1, keepdim=True).clamp_min(1e-20)
    p = (normalized * mask).sum(dim=1) / tokens  # [B, E]
    return (f * p).sum(-1).mean()


def routed_gates(model: torch.nn.Module) -> list[tuple[str, MoE]]:
    """The MoE layers with learned routing (they get balancing), main layers and MTP."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, MoE) and not m.gate.hash_routed]


def learned_routing(signals: Signals, n_hash_layers: int) -> list[Routing]:
    """A forward's routing of the `routed_gates` layers, in their order: the main layers after
    the hash-routed ones, then the MTP block."""
    return signals.routing[n_hash_layers:] + signals.mtp_routing


class ExpertLoad:
    """Tokens per expert over one optimizer step, per learned-routing layer; drives the
    loss-free bias update and the logged load statistics."""

    def __init__(self, model: torch.nn.Module, n_experts: int, device: torch.device):
        self.layers = routed_gates(model)
        self.counts = torch.zeros(len(self.layers), n_experts, device=device)

    def add(self, routing: list[Routing], token_mask: torch.Tensor) -> None:
        """Count a forward's routing of `self.layers` (`learned_routing`) over the real tokens."""
        if len(routing) != len(self.layers):
            raise ValueError(f"routing of {len(routing)} layers for {len(self.layers)} "
                             f"learned-routing layers")
        flat_mask = token_mask.reshape(-1)
        for i, (indices, _) in enumerate(routing):
            chosen = indices[flat_mask]
            self.counts[i] += torch.bincount(chosen.flatten(), minlength=self.counts.shape[1])

    def reduce(self) -> None:
        if dist.is_initialized():
            dist.all_reduce(self.counts)

    @torch.no_grad()
    def update_biases(self, speed: float) -> None:
        """b_i += speed * sign(mean load - load_i): overloaded experts get less likely."""
        for i, (_, moe) in enumerate(self.layers):
            load = self.counts[i]
            update = speed * torch.sign(load.mean() - load)
            add_to_parameter(moe.gate.bias, update)

    def max_violation(self) -> float:
        """max_i load_i / mean load - 1, averaged over layers (0 = perfectly balanced)."""
        mean = self.counts.mean(dim=1).clamp_min(1e-9)
        if not self.layers:
            return 0.0
        return float((self.counts.max(dim=1).values / mean - 1).mean())

    def reset(self) -> None:
        self.counts.zero_()


def add_to_parameter(param: torch.Tensor, update: torch.Tensor) -> None:
    """param += update, for a plain tensor or an FSDP2-sharded DTensor (update is full)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        update = distribute_tensor(update.to(param.dtype), param.device_mesh, param.placements)
    param.add_(update.to(param.dtype))


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    mesh: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK: join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh(device.type, (world,))
    return Dist(dist.get_rank(), world, mesh)


def parallelize(model: Transformer, mesh: Any, expert_parallel: bool = False) -> Transformer:
    """Data parallel with FSDP2: every block (and the MTP block) is its own `fully_shard`
    unit, gathered just before it runs and freed after; the root unit holds the embedding,
    the head and the final mHC head. Parameters become DTensors sharded on dim 0 (a stacked
    expert tensor [E, out, in] is split by whole experts, so Muon orthogonalizes them locally).
    expert_parallel: the routed experts are split the same way but never gathered (the tokens
    travel to them instead, dsv4/pretrain/parallel.py), so FSDP ignores them."""
    from torch.distributed.fsdp import fully_shard

    ignored = None
    if expert_parallel:
        from dsv4.pretrain.parallel import expert_parallel as split_experts

        ignored = split_experts(model, mesh)
    for block in list(model.layers) + list(model.mtp):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


# ---------------------------------------------------------------------------------------------
# Tokenizer and data
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4"))


def corpus_tokenizer(data: list[str] | None, vocab_size: int, cache_dir: Path,
                     progress: bool):
    """A byte-level BPE with `vocab_size` ids trained on the corpus, cached by the corpus's
    fingerprint (file names, sizes, mtimes) so the runs of one corpus share it."""
    from dsv4.pretrain.data import corpus_files, iter_documents
    from dsv4.text.tokenizer import Tokenizer, train_bpe

    files = corpus_files(data)
    key = json.dumps([vocab_size, [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
                                   for p, _ in files]])
    path = cache_dir / "tokenizers" / f"bpe-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return Tokenizer.from_file(path)
    tokenizer = train_bpe((d.text for d in iter_documents(data)), vocab_size,
                          show_progress=progress)
    tokenizer.save(path)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Throughput and MFU
# ---------------------------------------------------------------------------------------------


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                        size: int | None = None, seconds: float = 1.0, trials: int = 5) -> float:
    """FLOP/s of a square bf16 matmul on this device, the MFU denominator (measured, not a
    datasheet number): the best of a few short trials, so a busy moment does not count.
    size: 2048 on CPU, 8192 on GPU (large enough to reach the matmul units' rate)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / trials or count < 2:
            c = a @ b
            count += 1
        c.sum().item()
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Approximate training FLOPs per token: 6 x (active matrix parameters, the MTP block's
    active ones and its second use of the shared head included) plus the attention scores
    and values (forward + backward = 3 x 4 x heads x head_dim x attended keys: the window,
    plus top-k CSA or all visible HCA entries, at mid-sequence)."""
    from dsv4.model import costs

    params = costs.param_counts(cfg)
    active = params["active"]
    if cfg.n_mtp_layers:
        idle_experts = cfg.n_routed_experts - cfg.n_activated_experts
        active += params["mtp"] - idle_experts * params["routed_expert"] + params["head"]
    flops = 6 * active
    mid = seq_len / 2
    ratios = cfg.compress_ratios[: cfg.n_layers + cfg.n_mtp_layers]
    for ratio in ratios:
        keys = min(cfg.window_size, mid)
        if ratio == 4:
            keys += min(cfg.index_topk, mid / 4)
        elif ratio == 128:
            keys += mid / 128
        flops += 3 * 4 * cfg.n_heads * cfg.head_dim * keys
    return flops


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device={name!r}: CUDA is not available on this machine")
    return device


class Trainer:
    """Owns one run: model, optimizer, data, metrics, checkpoints. `run()` trains to tc.steps."""

    def __init__(self, tc: TrainConfig, resume: bool = False, log=print):
        self.tc, self.log = tc, log
        set_threads(tc.threads)
        self.device = pick_device(tc.device)
        self.dist = init_distributed(self.device)
        self.out = Path(tc.out)
        self.step = 0
        self.stop_requested = False
        self.lock: FolderLock | None = None
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (its lock); the process exiting does the same."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _claim_run_folder(self) -> None:
        """One process trains a run folder at a time (two `--resume` of one run would both
        append to metrics.jsonl and overwrite each other's checkpoints). Holding the lock,
        the temporary leftovers of a killed earlier process are removed and reported."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = FolderLock(self.out, what="training run")
        except FolderLocked as err:
            raise TrainingError(str(err)) from None
        removed = [remove_temp_leftovers(self.out),
                   remove_temp_leftovers(self.out / "checkpoints", suffixes=(".tmp", ".old"))]
        count, freed = sum(r[0] for r in removed), sum(r[1] for r in removed)
        if count:
            self.log(f"{self.out}: removed {count} temporary file(s) or folder(s) left by an "
                     f"interrupted write ({freed / 2**20:.1f} MiB)")

    # -- setup -----------------------------------------------------------------------------
    def _setup(self, resume: bool) -> None:
        from dsv4.pretrain.data import PackedLoader, TokenStore, validation_batches
        from dsv4.pretrain.optim import build_optimizer

        if self.dist.main:
            self._claim_run_folder()
        latest = self._latest_checkpoint()
        if resume:
            self._load_run_settings(latest)
        elif latest is not None:
            raise TrainingError(f"{self.out} already holds a run (checkpoint {latest.name}); "
                                f"pass --resume to continue it or --out to start a new one")
        tc = self.tc  # after resume replaced it: the run's saved settings, not the command's
        tc.plan()
        cfg = self._model_config()
        tc.model_config = cfg.to_dict()
        self.cfg = cfg
        world = self.dist.world_size
        micro = tc.micro_batch or max(1, tc.batch_size // world)
        if tc.batch_size % (micro * world):
            raise TrainingError(f"batch_size={tc.batch_size} must be a multiple of "
                                f"micro_batch ({micro}) x processes ({world})")
        self.micro, self.accum = micro, tc.batch_size // (micro * world)
        cache = Path(tc.cache_dir) if tc.cache_dir else default_cache_dir()
        show = tc.progress and self.dist.main
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            tokenizer = corpus_tokenizer(tc.data, cfg.vocab_size, cache, show)
            TokenStore.build(tc.data, tokenizer, cache / "tokens", tc.val_fraction, show)
        self._barrier()
        tokenizer = corpus_tokenizer(tc.data, cfg.vocab_size, cache, False)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the "
                                f"model's vocab_size={cfg.vocab_size}")
        self.tokenizer = tokenizer
        store = TokenStore.build(tc.data, tokenizer, cache / "tokens", tc.val_fraction, False)
        self.store = store
        self.loader = PackedLoader(store, "train", micro, tc.seq_len, seed=tc.seed,
                                   rank=self.dist.rank, world_size=world)
        self.val = (spread(validation_batches(store, micro, tc.seq_len, rank=self.dist.rank,
                                              world_size=world), tc.eval_batches)
                    if store.n_documents("val") >= world and tc.eval_batches > 0 else [])
        torch.manual_seed(tc.seed)
        model = Transformer(cfg)
        model.init_weights(seed=tc.seed)
        if latest is not None:
            self._load_weights(model, latest)
        model.to(self.device)
        if self.dist.world_size > 1:
            parallelize(model, self.dist.mesh, expert_parallel=tc.expert_parallel)
        self.model = model
        # Newton-Schulz in bf16 when training in bf16: stable (V4 report §3.4.1), 2x faster on CPU
        ns_dtype = torch.bfloat16 if tc.autocast == "bf16" else None
        self.optimizer = build_optimizer(model, tc.optimizer, lr=tc.lr,
                                         weight_decay=tc.weight_decay, ns_dtype=ns_dtype)
        self.load = ExpertLoad(model, cfg.n_routed_experts, self.device)
        self.flops_per_token = train_flops_per_token(cfg, tc.seq_len)
        self.peak_flops = measure_matmul_peak(self.device)
        if latest is not None:
            self._load_trainer_state(latest)
        elif self.dist.main:
            cfg.save(self.out / "config.json", dialect="official")
            write_json_atomic(self.out / TRAIN_CONFIG_NAME, tc.to_dict())
            tokenizer.save(self.out / "tokenizer.json")
            (self.out / METRICS_NAME).unlink(missing_ok=True)
        if self.dist.main and latest is not None:
            write_json_atomic(self.out / TRAIN_CONFIG_NAME, tc.to_dict())
            self._truncate_metrics(self.step)

    def _model_config(self) -> ModelConfig:
        tc = self.tc
        if tc.model_config is not None:
            return ModelConfig.from_dict(tc.model_config)
        if tc.config_path is not None:
            return ModelConfig.from_file(tc.config_path)
        return ModelConfig.from_preset(tc.preset or "nano")

    def _load_run_settings(self, latest: Path | None) -> None:
        """--resume: the run's saved settings, except steps and the per-session options."""
        path = self.out / TRAIN_CONFIG_NAME
        if latest is None or not path.is_file():
            raise TrainingError(f"--resume: {self.out} holds no checkpoint to resume from")
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
        if self.tc.expert_parallel and not saved.expert_parallel:
            raise TrainingError(f"--expert-parallel: the run in {self.out} was started without "
                                f"it; resume it without the flag (the setting is the run's)")
        for name in ("out", "steps", "progress", "device", "threads", "samples",
                     "sample_tokens", "cache_dir"):
            if getattr(self.tc, name) is not None:
                setattr(saved, name, getattr(self.tc, name))
        self.tc = saved

    def _latest_checkpoint(self) -> Path | None:
        from dsv4.weights.checkpoint import CheckpointError, read_latest

        latest = self.out / "checkpoints" / "latest"
        try:
            folder = read_latest(latest.parent)
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
        if folder is None:
            return None
        if not any(folder.glob("trainer*.pt")):  # trainer.pt, or trainer_rank{r}.pt (torchrun)
            raise TrainingError(f"{latest} names {folder.name}, which holds no trainer state")
        return folder

    def _load_weights(self, model: Transformer, folder: Path) -> None:
        from dsv4.weights.checkpoint import load

        loaded = load(folder)
        model.load_state_dict(loaded.state_dict())

    def _load_trainer_state(self, folder: Path) -> None:
        path = folder / self._trainer_state_name()
        if not path.is_file():
            saved = sorted(p.name for p in folder.glob("trainer*.pt"))
            raise TrainingError(f"{folder} holds {saved}, not {path.name}: it was saved by a "
                                f"different number of processes than this "
                                f"{self.dist.world_size}; resume it with the same number")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["world_size"] != self.dist.world_size:
            raise TrainingError(f"{folder} was saved by {state['world_size']} processes; resume "
                                f"it with the same number (this is {self.dist.world_size})")
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])

    def _trainer_state_name(self) -> str:
        if self.dist.world_size == 1:
            return TRAINER_STATE_NAME
        return f"trainer_rank{self.dist.rank}.pt"

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- one step --------------------------------------------------------------------------
    def autocast(self):
        return bf16_autocast(self.tc.autocast == "bf16", self.device)

    def forward_losses(self, batch) -> dict[str, torch.Tensor]:
        """Summed losses of one micro-batch (sums, normalized by the caller) and counts."""
        pad = self.store.pad_id
        ids, targets, doc_ids = (t.to(self.device) for t in
                                 (batch.input_ids, batch.targets, batch.doc_ids))
        model = self.model
        with self.autocast():
            if self.cfg.n_mtp_layers:
                mtp_in, mtp_targets = mtp_inputs_and_targets(targets, pad)
                (logits, mtp_logits), signals = model(ids, mtp_input_ids=mtp_in, doc_ids=doc_ids,
                                                      signals=True)
            else:
                logits, signals = model(ids, doc_ids=doc_ids, signals=True)
                mtp_logits = None
        out = {"ce": F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"),
               "tokens": (targets != IGNORE_INDEX).sum()}
        if mtp_logits is not None:
            out["mtp"] = F.cross_entropy(mtp_logits.flatten(0, 1), mtp_targets.flatten(),
                                         reduction="sum")
            out["mtp_tokens"] = (mtp_targets != IGNORE_INDEX).sum()
        token_mask = ids != pad
        routing = learned_routing(signals, self.cfg.n_hash_layers)
        balance = [sequence_balance_loss(*layer, token_mask, self.cfg.n_routed_experts)
                   for layer in routing]
        out["balance"] = torch.stack(balance).sum() if balance else logits.new_zeros(())
        indexer = signals.indexer_losses
        out["indexer"] = torch.stack(indexer).mean() if indexer else logits.new_zeros(())
        self.load.add(routing, token_mask)
        return out

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; returns the logged numbers."""
        tc, step = self.tc, self.step
        self.model.train()
        self.model.set_indexer_mode(indexer_mode(step, tc))
        factor = lr_factor(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        batches = [self.loader.next_batch() for _ in range(self.accum)]
        counts = torch.tensor([[float(b.n_target_tokens) for b in batches]]).sum()
        n_targets = float(all_reduce_sum(counts.to(self.device)))
        mtp_counts = sum(int(mtp_inputs_and_targets(b.targets, 0)[1].ne(IGNORE_INDEX).sum())
                         for b in batches)
        n_mtp = float(all_reduce_sum(torch.tensor(float(mtp_counts), device=self.device)))
        world, mtp_w = self.dist.world_size, mtp_weight(step, tc)
        rows = self.accum * self.micro * world
        totals = dict(ce=0.0, mtp=0.0, balance=0.0, indexer=0.0)
        self.load.reset()
        for batch in batches:
            parts = self.forward_losses(batch)
            # Sums over the global batch / global counts; x world because FSDP averages grads.
            loss = parts["ce"] / max(n_targets, 1)
            if "mtp" in parts:
                loss = loss + mtp_w * parts["mtp"] / max(n_mtp, 1)
            loss = loss + tc.balance_loss_weight * parts["balance"] * self.micro / rows
            loss = loss + tc.indexer_loss_weight * parts["indexer"] / (self.accum * world)
            (loss * world).backward()
            totals["ce"] += float(parts["ce"].detach())
            totals["mtp"] += float(parts.get("mtp", torch.zeros(())).detach())
            totals["balance"] += float(parts["balance"].detach()) * self.micro / rows
            totals["indexer"] += float(parts["indexer"].detach()) / (self.accum * world)
        summed = all_reduce_sum(torch.tensor(list(totals.values()), device=self.device,
                                             dtype=torch.float64))
        ce, mtp, balance, indexer = summed.tolist()
        loss_value = ce / max(n_targets, 1)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message(loss_value))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message(grad_norm, what="gradient norm"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.load.reduce()
        self.load.update_biases(tc.bias_update_speed)
        self.step += 1
        return dict(
            loss=loss_value, mtp_loss=mtp / max(n_mtp, 1), balance_loss=balance,
            indexer_loss=indexer, grad_norm=grad_norm, lr=tc.lr * factor, mtp_weight=mtp_w,
            indexer_mode=indexer_mode(step, tc), tokens=int(n_targets),
            expert_load_max_violation=self.load.max_violation(),
        )

    def _diverged_message(self, value: float, what: str = "loss", step: int | None = None
                          ) -> str:
        # Only what is known is claimed: the latest checkpoint's weights were finite when it
        # was saved (save_checkpoint checks) and are checked again when loaded; whether
        # training from it diverges again is not known.
        latest = self._latest_checkpoint()
        keep = (f"the latest checkpoint {latest} (weights checked when saved) is kept; resume "
                f"from it with --resume (after lowering --lr, for instance)"
                if latest is not None else "no checkpoint was written yet")
        step = self.step + 1 if step is None else step
        return f"{what} is {value} at step {step}: training stopped; {keep}"

    def _check_weights_savable(self) -> None:
        """Save only weights that loading accepts (finite, within +-MAX_WEIGHT_MAGNITUDE): a
        finite loss does not rule out broken weights, the optimizer step after it can still
        produce them."""
        from dsv4.weights.checkpoint import MAX_WEIGHT_MAGNITUDE

        bad = []
        for name, param in self.model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if local.numel():
                low, high = (float(v) for v in torch.aminmax(local.detach()))
                if not (-MAX_WEIGHT_MAGNITUDE <= low and high <= MAX_WEIGHT_MAGNITUDE):
                    bad.append(name)
        if all_reduce_sum(torch.tensor(float(len(bad)), device=self.device)) > 0:
            what = f"parameter {bad[0]!r}" if bad else "a parameter (on another process)"
            raise TrainingDiverged(self._diverged_message(
                f"NaN/inf or beyond +-{MAX_WEIGHT_MAGNITUDE:g}", what=f"{what} after the update",
                step=self.step))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the fixed validation batches (current indexer mode)."""
        if not self.val:
            return None
        self.model.eval()
        self.model.set_indexer_mode(indexer_mode(max(self.step - 1, 0), self.tc))
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.val:
            ids, targets, doc_ids = (t.to(self.device) for t in
                                     (batch.input_ids, batch.targets, batch.doc_ids))
            with self.autocast():
                logits = self.model(ids, doc_ids=doc_ids)
            total[0] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                        reduction="sum").double()
            total[1] += (targets != IGNORE_INDEX).sum()
        total = all_reduce_sum(total)
        return float(total[0] / total[1].clamp_min(1))

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until tc.steps; returns a summary. Ctrl-C saves a checkpoint and returns
        with `interrupted` True; a NaN/inf loss raises TrainingDiverged."""
        from tqdm import tqdm

        tc = self.tc
        if self.step >= tc.steps:
            self.log(f"{self.out}: already at step {self.step} of {tc.steps}; nothing to train "
                     f"(pass a larger --steps to continue)")
            return self.summary(interrupted=False)
        bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step",
                   disable=not (tc.progress and self.dist.main), dynamic_ncols=True)
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        interrupted = False
        self.last_val = None
        try:
            while self.step < tc.steps:
                start = time.perf_counter()
                metrics = self.train_step()
                elapsed = time.perf_counter() - start
                tokens_per_s = metrics["tokens"] / elapsed
                peak = self.peak_flops * self.dist.world_size
                metrics.update(step=self.step, tokens_per_s=tokens_per_s, step_time_s=elapsed,
                               mfu=tokens_per_s * self.flops_per_token / peak)
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    metrics["val_loss"] = self.last_val = self.evaluate()
                if self.step % tc.log_every == 0 or "val_loss" in metrics:
                    self._log_metrics(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}",
                                mfu=f"{metrics['mfu']:.1%}", lr=f"{metrics['lr']:.1e}",
                                attn=metrics["indexer_mode"])
                if self.step % tc.save_every == 0 or self.step == tc.steps:
                    self.save_checkpoint()
                if self._stop_agreed():
                    interrupted = True
                    if self._latest_step() != self.step:
                        self.save_checkpoint()
                    break
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
            if self.dist.main:
                self._plot_quietly()
        return self.summary(interrupted)

    def _plot_quietly(self) -> None:
        """The plot is a convenience: failing to write it (a full disk) must not hide the
        error that stopped training."""
        try:
            plot_metrics(self.out)
        except OSError as err:
            from dsv4.files import os_error_message

            self.log(f"loss plot not written: {os_error_message(err)}")

    def _on_sigint(self, signum, frame) -> None:  # noqa: ANN001 - signal handler signature
        if self.stop_requested:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.dist.main:
            self.log("\nCtrl-C: finishing this step and saving a checkpoint "
                     "(press again to quit without saving)")

    def _stop_agreed(self) -> bool:
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        return bool(all_reduce_sum(flag) > 0)

    def _latest_step(self) -> int | None:
        latest = self._latest_checkpoint()
        return int(latest.name.split("_")[-1]) if latest is not None else None

    def summary(self, interrupted: bool) -> dict[str, Any]:
        return dict(step=self.step, steps=self.tc.steps, interrupted=interrupted,
                    run=str(self.out), val_loss=getattr(self, "last_val", None))

    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        append_line(self.out / METRICS_NAME, json.dumps(metrics))  # whole line or nothing

    def _truncate_metrics(self, step: int) -> None:
        """Drop logged steps after the checkpoint we resume from (they will be redone), and a
        torn last line (a write cut short by a kill or a full disk), saying so."""
        path = self.out / METRICS_NAME
        if not path.is_file():
            return
        rows, torn = parse_metrics(path)
        if torn:
            self.log(f"{path}: dropped a torn last line ({torn!r:.60}), left by an "
                     "interrupted write")
        kept = [json.dumps(row) for row in rows if row.get("step", 0) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/step_N: native model checkpoint + trainer state, then `latest` -> it.
        `latest` is replaced last (atomically), so it always names a complete checkpoint."""
        from dsv4.weights.checkpoint import mark_latest, run_checkpoint, save

        self._check_weights_savable()
        folder = run_checkpoint(self.out, self.step)
        plain = self._full_model()
        if self.dist.main:
            save(plain, folder, format="native", tokenizer=self.tokenizer)
        self._barrier()
        state = dict(step=self.step, optimizer=self.optimizer.state_dict(),
                     loader=self.loader.state_dict(), rng=torch.get_rng_state(),
                     world_size=self.dist.world_size, train_config=self.tc.to_dict())
        save_torch_atomic(state, folder / self._trainer_state_name())
        self._barrier()
        if self.dist.main:
            mark_latest(folder)
            self._prune_checkpoints(folder.parent, keep=self.tc.keep_checkpoints)
        self._barrier()
        return folder

    def _full_model(self) -> Transformer | None:
        """The model with full (unsharded) CPU tensors: itself, or under FSDP a gathered copy
        on rank 0 (None on the other ranks)."""
        if self.dist.world_size == 1:
            return self.model
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.dist.main:
            return None
        with torch.device("meta"):
            plain = Transformer(self.cfg)
        plain.load_state_dict(state, assign=True)
        rebuild_rope_tables(plain)
        return plain

    @staticmethod
    def _prune_checkpoints(checkpoints: Path, keep: int) -> None:
        import shutil

        folders = sorted(p for p in checkpoints.glob("step_*") if p.is_dir())
        for old in folders[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over the list (validation batches from every part of the
    validation split, not just its first documents)."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] if count > 1 else items[0]
            for i in range(count)]


def save_torch_atomic(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


# ---------------------------------------------------------------------------------------------
# Plot and samples
# ---------------------------------------------------------------------------------------------


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run) / METRICS_NAME
    if not path.is_file():
        return []
    return parse_metrics(path)[0]


def parse_metrics(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The rows of a metrics.jsonl and its torn last line ("" if none). Only the last line
    may be torn (an append cut short); a bad line before it is damage: a TrainingError
    naming the line."""
    lines = path.read_bytes().split(b"\n")
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if lineno == len(lines):  # no newline after it: an interrupted append
                return rows, raw.decode("utf-8", "replace")
            raise TrainingError(f"{path}:{lineno}: not a metrics line ({err}); remove the "
                                "line to continue") from None
        rows.append(row)
    return rows, ""


def plot_metrics(run: str | os.PathLike[str]) -> Path | None:
    """loss.png: training loss (and MTP loss) and validation loss against the step."""
    rows = read_metrics(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    sparse = next((r["step"] for r in rows if r.get("indexer_mode") == "sparse"), None)
    if sparse is not None:
        ax.axvline(sparse, color="gray", ls=":", label="sparse top-k attention starts")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"dsv4 train: {Path(run).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    target = Path(run) / PLOT_NAME
    with atomic_write(target, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target


@torch.no_grad()
def generate_samples(model: Transformer, tokenizer, prompts: Iterator[str] | tuple[str, ...],
                     max_tokens: int, temperature: float = 0.8, seed: int = 0) -> list[str]:
    """Continue each prompt with the inference engine."""
    from dsv4.inference.engine import Engine, SamplingParams

    model.eval()
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    outputs = Engine(model).generate(encoded, SamplingParams(temperature=temperature,
                                                             max_tokens=max_tokens, seed=seed))
    return [p + tokenizer.decode(out) for p, out in zip(prompts, outputs)]


# ---------------------------------------------------------------------------------------------
# Entry point used by `dsv4 train`
# ---------------------------------------------------------------------------------------------


def train(tc: TrainConfig, resume: bool = False, log=print) -> dict[str, Any]:
    """Create (or with resume, continue) the run in tc.out and train it to tc.steps."""
    trainer = Trainer(tc, resume=resume, log=log)
    try:
        return _train(trainer, log)
    finally:
        trainer.close()


def _train(trainer: Trainer, log) -> dict[str, Any]:
    tc = trainer.tc
    main = trainer.dist.main
    if main:
        cfg = trainer.cfg
        log(f"run {trainer.out}: {trainer.cfg.n_layers} layers, dim {cfg.dim}, "
            f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f} M parameters; "
            f"{tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens "
            f"({trainer.accum} micro-batch(es) of {trainer.micro} x {trainer.dist.world_size} "
            f"process(es)); {tc.optimizer}; dense CSA until step {tc.sparse_start_step}, "
            f"sparse top-{cfg.index_topk} after; device {trainer.device}"
            + (f"; resuming at step {trainer.step}" if trainer.step else ""))
    summary = trainer.run()
    if main and summary["interrupted"]:
        log(f"stopped at step {trainer.step}; checkpoint saved. Continue with: "
            f"dsv4 train --out {trainer.out} --resume")
    elif main:
        rows = read_metrics(trainer.out)
        if rows:
            last = rows[-1]
            log(f"step {last['step']}: loss {last['loss']:.3f}"
                + (f", val loss {summary['val_loss']:.3f}" if summary["val_loss"] else "")
                + f"; metrics in {trainer.out / METRICS_NAME}, plot {trainer.out / PLOT_NAME}")
    if main and not summary["interrupted"] and tc.samples > 0:
        model = trainer._full_model() if trainer.dist.world_size > 1 else trainer.model
        model.set_indexer_mode("sparse")
        samples = generate_samples(model, trainer.tokenizer, SAMPLE_PROMPTS[: tc.samples],
                                   tc.sample_tokens, seed=tc.seed)
        summary["samples"] = samples
        for text in samples:
            log("-" * 60 + "\n" + text)
    elif trainer.dist.world_size > 1 and not summary["interrupted"] and tc.samples > 0:
        trainer._full_model()  # the gather is collective: every rank takes part
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary

