"""The scale flags of ``bitsmith quantize`` (streaming, memory budget, offload, shard size) and their parsing;
the decisions themselves live in :mod:`bitsmith.plan`."""

from __future__ import annotations

import argparse
import re

from ..end_to_end import MODES
from ..plan import MemoryLimits

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def add_arguments(q: argparse.ArgumentParser) -> None:
    """The scale flags of ``bitsmith quantize``."""
    s = q.add_argument_group("scale (models larger than memory; docs/scale.md)")
    s.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read one block at a time from the safetensors files and write the output shard by shard "
                        "(default: automatic, when the loaded model would take more than half the host budget)")
    s.add_argument("--max-memory", default=None,
                   help="memory budget: SIZE for the compute device (host RAM on the CPU), or cpu=SIZE,device=SIZE "
                        "(e.g. 20GiB, 512MiB; default: what is free)")
    s.add_argument("--offload-dir", default=None,
                   help="folder for calibration activations that fit neither the device nor host memory")
    s.add_argument("--max-shard-size", default="5GB", help="largest weight file of a streamed output (default 5GB)")
    s.add_argument("--e2e-mode", default="auto", choices=("auto", *MODES),
                   help="how the end-to-end norm tuning runs: whole (autograd through the model, fastest), "
                        "checkpointed (block by block, chunked KL), offloaded (blocks moved to the device in turn), "
                        "streamed (blocks read back from disk; --stream); default auto: the first that fits")


def parse_size(text: str, flag: str) -> int:
    """``"20GiB"``, ``"512MB"``, ``"1.5GiB"``, ``"1000000"`` → bytes (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    from ..errors import UsageError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UsageError(f"{flag}: cannot read {text!r} as a size; use e.g. 20GiB, 512MiB or 5GB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise UsageError(f"{flag} must be positive, got {text!r}")
    return value


def parse_max_memory(text: str | None) -> MemoryLimits:
    """``SIZE`` (the compute device; host RAM on the CPU) or ``cpu=SIZE,device=SIZE`` (``0=SIZE`` as in
    accelerate means the device) → :class:`~bitsmith.plan.MemoryLimits`."""
    from ..errors import UsageError

    if not text:
        return MemoryLimits()
    if "=" not in text:
        return MemoryLimits(compute=parse_size(text, "--max-memory"))
    device = host = None
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key in ("cpu", "host"):
            host = parse_size(value, "--max-memory cpu")
        elif key in ("device", "gpu", "accelerator") or key.isdigit():
            device = parse_size(value, "--max-memory device")
        else:
            raise UsageError(f"--max-memory: unknown key {key!r}; use SIZE or cpu=SIZE,device=SIZE")
    return MemoryLimits(device=device, host=host)
