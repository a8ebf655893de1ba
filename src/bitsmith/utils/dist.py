"""torch.distributed helpers: no-ops in a single process, collective operations under ``torchrun``.

Every rank holds a disjoint share of the calibration samples; the algorithms call these helpers where a
statistic or a gradient must describe the global set. Without an initialised process group each helper returns
its input unchanged, so single-process code paths pay nothing.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """True when a process group is up (``torchrun`` + :func:`init_process_group`)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0: the only rank that writes files and shows progress."""
    return rank() == 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns ``t``."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_scalar(x: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (every rank must call it with its own value)."""
    if world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    all_reduce_sum_(t)
    return float(t.item()) / world_size()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks (one optimizer step sees the global batch)."""
    n = world_size()
    if n == 1:
        return
    for p in params:
        if p.grad is not None:
            all_reduce_sum_(p.grad)
            p.grad.div_(n)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s copy, in place; returns ``t``."""
    if world_size() > 1:
        dist.broadcast(t, src=src)
    return t
