"""The one place that knows accelerator names.

Everything else asks this module for a device, a compute dtype, an autocast context or memory statistics;
no other module writes an accelerator's name as a literal.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import ConfigError

_ACCEL = "cuda"  # the only literal accelerator name in the package


def accelerator_available() -> bool:
    """True when a CUDA-style accelerator is present."""
    return torch.cuda.is_available()


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Turn a user's device choice into a ``torch.device``.

    ``None`` or ``"auto"`` picks the accelerator when present, else the CPU. Asking for an accelerator that
    is absent raises a ``ValueError`` naming the fix.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device(_ACCEL if accelerator_available() else "cpu")
    dev = torch.device(name)
    if dev.type == _ACCEL and not accelerator_available():
        raise ConfigError(f"device {name!r} requested but no accelerator is available; use --device cpu")
    return dev


def is_accelerator(device: torch.device | str) -> bool:
    """True when ``device`` is an accelerator (not the CPU)."""
    return torch.device(device).type == _ACCEL


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Model dtype to load in: fp32 on CPU (bf16 matmul is ~250x slower there), fp16 on an accelerator."""
    return torch.float16 if is_accelerator(device) else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype | None = torch.bfloat16) -> Iterator[None]:
    """Mixed precision on an accelerator; a no-op on the CPU (calibration there runs in fp32)."""
    if is_accelerator(device) and dtype is not None:
        with torch.autocast(device_type=_ACCEL, dtype=dtype):
            yield
    else:
        yield


def empty_cache(device: torch.device | str) -> None:
    """Release cached accelerator memory (no-op on the CPU)."""
    if is_accelerator(device):
        torch.cuda.empty_cache()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued accelerator work (no-op on the CPU)."""
    if is_accelerator(device):
        torch.cuda.synchronize(torch.device(device))


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the peak-memory counter of an accelerator (no-op on the CPU)."""
    if is_accelerator(device):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory: accelerator allocations, or this process's peak resident set size on the CPU."""
    if is_accelerator(device):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
