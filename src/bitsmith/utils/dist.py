"""torch.distributed helpers: no-ops in a single process, collective operations under ``torchrun``.

Data-parallel calibration (``torchrun --nproc-per-node N -m bitsmith quantize …``): every rank holds a disjoint,
interleaved share of the calibration samples (:func:`shard_samples`: rank ``r`` gets samples ``r, r+N, r+2N, …``
and splits each global batch of ``batch_size`` samples into its own micro-batch of ``batch_size / N``). The
algorithms call these helpers where a statistic or a gradient must describe the global set (Hessians, channel
ranges, losses, gradients) and to spread per-layer work by ownership (:func:`assign_owners`,
:func:`broadcast_tensors`). Without an initialised process group each helper returns its input unchanged, so
single-process code paths pay nothing.

The backend follows the compute device: ``nccl`` (or the accelerator's default backend) when calibrating on an
accelerator, each rank on the accelerator of its ``LOCAL_RANK``; ``gloo`` on the CPU. Collectives run on the
backend's device (tensors on another device are copied there and back).

Failure model: an exception on one rank ends that process with a non-zero exit code; ``torchrun`` then stops
the other ranks (they may also fail on their own when the dead peer's connection closes). A rank that stops
answering without exiting is caught only by the process group's timeout (:data:`TIMEOUT`).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .device import is_accelerator

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # longest a collective waits for a silent peer
_comm_device: torch.device | None = None  # where collectives run (set by init_from_env)


# ---- process group -------------------------------------------------------------------------------------
def env_rank() -> int:
    """This process's rank from the launcher's environment (``RANK``; 0 when not launched by ``torchrun``)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """Number of processes from the launcher's environment (``WORLD_SIZE``; 1 when not under ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group described by ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and return this rank's compute device.

    One process (no ``WORLD_SIZE`` > 1): nothing is initialised and ``device`` is returned unchanged. On an
    accelerator each rank uses the one of index ``LOCAL_RANK`` (an explicit index in ``device`` is replaced)
    with the accelerator's default backend (``nccl``); on the CPU the backend is ``gloo``.
    """
    global _comm_device
    if env_world_size() <= 1 or is_initialized():
        return device
    if is_accelerator(device):
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
        torch.accelerator.set_device_index(device.index)
    backend = dist.get_default_backend_for_device(device)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    _comm_device = device if backend != "gloo" else torch.device("cpu")
    log.debug("rank %d of %d: %s backend, compute device %s", rank(), world_size(), backend, device)
    return device


def teardown() -> None:
    """Leave the process group (no-op when none is up)."""
    global _comm_device
    if is_initialized():
        dist.destroy_process_group()
    _comm_device = None


def is_initialized() -> bool:
    """True when a process group is up (``torchrun`` + :func:`init_from_env`)."""
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


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if world_size() > 1:
        dist.barrier()


# ---- collectives -----------------------------------------------------------------------------------------
def _device() -> torch.device:
    if _comm_device is not None:
        return _comm_device
    return torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(
        torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())


def _collective_(t: torch.Tensor, fn) -> torch.Tensor:
    """Apply the in-place collective ``fn`` to ``t`` on the backend's device (copying there and back)."""
    dev = _device()
    if t.device == dev and t.is_contiguous():
        fn(t)
        return t
    tmp = t.to(dev).contiguous()
    fn(tmp)
    t.copy_(tmp)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns ``t``."""
    if world_size() > 1:
        _collective_(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over ranks, in place; returns ``t``."""
    if world_size() > 1:
        _collective_(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MAX))
    return t


def all_reduce_min_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum of ``t`` over ranks, in place; returns ``t``."""
    if world_size() > 1:
        _collective_(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MIN))
    return t


def sum_scalars(values: Sequence[float]) -> list[float]:
    """Sums over ranks of several scalars at once (float64; every rank passes its own values, same length)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return all_reduce_sum_(t).tolist()


def mean_scalar(x: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (every rank must call it with its own value)."""
    if world_size() == 1:
        return float(x)
    return sum_scalars([float(x)])[0] / world_size()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks (one optimizer step sees the global batch).

    The gradients are reduced as one flat buffer per dtype and device (one collective per step). Every rank
    must pass the same parameters in the same order, with gradients present on the same ones.
    """
    n = world_size()
    if n == 1:
        return
    grads: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            grads.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for group in grads.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        all_reduce_sum_(flat).div_(n)
        offset = 0
        for g in group:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s copy, in place; returns ``t``."""
    if world_size() > 1:
        _collective_(t, lambda x: dist.broadcast(x, src=src))
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s (small, picklable) ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor | None] | None, src: int, device: torch.device | str,
                      extra: Any = None) -> tuple[list[torch.Tensor | None], Any]:
    """Rank ``src``'s list of tensors (entries may be None) and small object ``extra`` on every rank.

    Other ranks pass anything for ``tensors`` (ignored) and receive new tensors on ``device``; rank ``src``
    gets its own tensors back. Shapes and dtypes travel first, so receivers need not know them.
    """
    if world_size() == 1:
        return list(tensors or []), extra
    mine = rank() == src
    meta = broadcast_object(([None if t is None else (tuple(t.shape), t.dtype) for t in tensors], extra)
                            if mine else None, src)
    shapes, extra = meta
    out: list[torch.Tensor | None] = []
    for i, sd in enumerate(shapes):
        if sd is None:
            out.append(None)
            continue
        t = tensors[i] if mine else torch.empty(sd[0], dtype=sd[1], device=device)
        out.append(broadcast_(t, src))
    return out, extra


# ---- work split ------------------------------------------------------------------------------------------
def assign_owners(costs: dict[str, float], world: int | None = None) -> dict[str, int]:
    """Give each item a rank so that the summed cost per rank is balanced: longest-processing-time greedy
    (items by decreasing cost, each to the least-loaded rank, ties to the lower rank). Deterministic: every rank
    computes the same assignment from the same ``costs``."""
    world = world_size() if world is None else world
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # stable: equal costs keep their given order
        r = min(range(world), key=lambda k: (load[k], k))
        owners[name] = r
        load[r] += costs[name]
    return {n: owners[n] for n in costs}


def shard_samples(samples: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """This rank's share of the calibration samples ``(N, T)`` and its micro-batch size.

    ``batch_size`` is global (samples per step over all ranks). Rank ``r`` of ``W`` gets rows ``r, r+W, …``
    ``(N/W, T)``, so its ``s``-th micro-batch of ``batch_size/W`` rows and the other ranks' together are exactly
    the single-process batch ``s``. Raises ``ValueError`` unless ``W`` divides ``batch_size`` and ``batch_size``
    divides ``N``.
    """
    w = world_size()
    if w == 1:
        return samples, batch_size
    check_shardable(samples.shape[0], batch_size, w)
    return samples[rank()::w], batch_size // w


def check_shardable(nsamples: int, batch_size: int, world: int | None = None) -> None:
    """Raise ``ValueError`` (one line naming the fix) unless ``world`` processes can split ``nsamples`` samples
    into global batches of ``batch_size``: ``world`` divides ``batch_size``, which divides ``nsamples``."""
    w = world_size() if world is None else world
    if w == 1:
        return
    if batch_size % w:
        raise ConfigError(f"--batch-size {batch_size} is not a multiple of the {w} processes (it counts samples per "
                         f"step over all processes); pass --batch-size {w * -(-batch_size // w)}")
    if nsamples % batch_size:
        raise ConfigError(f"--nsamples {nsamples} is not a multiple of --batch-size {batch_size}; "
                         f"pass --nsamples {batch_size * max(1, nsamples // batch_size)}")


def local_row_budget(max_rows: int, rows_per_sample: int, local_samples: int) -> int:
    """How many of its own rows this rank keeps so that all ranks together keep the first ``max_rows`` rows
    of the single-process order (samples of ``rows_per_sample`` rows each, interleaved as in
    :func:`shard_samples`)."""
    w, r = world_size(), rank()
    if w == 1:
        return max_rows
    total = 0
    for i in range(local_samples):
        j = r + i * w  # global sample index
        total += min(rows_per_sample, max(0, max_rows - j * rows_per_sample))
    return total
