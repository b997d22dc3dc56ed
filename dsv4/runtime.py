"""Process set-up the commands share: torch's CPU threads and bf16 autocast."""

from __future__ import annotations

import os

import torch


def set_threads(threads: int | None, all_cores: bool = False) -> None:
    """torch's CPU threads: `threads` when given; else, with `all_cores`, every core this
    process may use (post-training: rollouts are CPU-bound), else torch's own default."""
    if threads is None and all_cores and hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))
    if threads:
        torch.set_num_threads(threads)


def bf16_autocast(enabled: bool, device: torch.device) -> torch.autocast:
    """bf16 autocast on `device` (fp32 master weights, bf16 matmuls); a no-op when disabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
