"""Fused inference kernels for packed layers (optional: ``pip install -e ".[gpu]"`` for Triton).

This package is cheap to import: Triton is imported only when a kernel could run, i.e. on an accelerator, or on
the CPU when ``TRITON_INTERPRET=1`` is set (Triton's interpreter, used by the tests to check the kernels without a
GPU). The kernels themselves live in :mod:`bitsmith.nn.kernels.w4_triton`.

* :func:`w4_group_size` — whether a packed layer's layout is one the W4 kernel reads (pure Python, no Triton).
* :func:`w4_available` — whether the W4 kernel can run on a device.
"""

from __future__ import annotations

import os

import torch

from ...formats import IntFormat, PerChannel, PerGroup, PerTensor, QuantSpec
from ...utils.device import is_accelerator

#: group sizes the kernel reads are powers of two, at least this (a tile of the tiled variant has ≥ 16 columns
#: and lies inside one group)
W4_MIN_GROUP = 16
W4_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = ("1", "true", "on", "yes", "y")


def w4_group_size(spec: QuantSpec, out_features: int, in_features: int, scale: torch.Tensor,
                  zero: torch.Tensor | None) -> int | None:
    """The kernel's ``GROUP_SIZE`` for a packed layer (0: one scale per row or per tensor), or None when the
    layout is not one the W4 kernel reads.

    Supported: 4-bit :class:`~bitsmith.formats.IntFormat` (asymmetric with a uint8 zero point, or symmetric),
    per tensor, per channel, or per group with a power-of-two ``group_size ≥ 16`` (a ragged last group,
    ``in % g != 0``, is fine); ``scale`` ``(out, ceil(in / g))`` (``(1, 1)`` per tensor) and ``zero`` of the same shape.
    """
    fmt, gran = spec.format, spec.granularity
    if not isinstance(fmt, IntFormat) or fmt.bits != 4:
        return None
    if isinstance(gran, PerGroup):
        if gran.group_size < W4_MIN_GROUP or gran.group_size & (gran.group_size - 1):
            return None
        rows, groups, size = out_features, -(-in_features // gran.group_size), gran.group_size
    elif isinstance(gran, PerChannel):
        rows, groups, size = out_features, 1, 0
    elif isinstance(gran, PerTensor):
        rows, groups, size = 1, 1, 0
    else:
        return None
    if tuple(scale.shape) != (rows, groups) or not scale.is_floating_point():
        return None
    if fmt.symmetric != (zero is None):
        return None
    if zero is not None and (zero.dtype != torch.uint8 or tuple(zero.shape) != (rows, groups)):
        return None
    return size


def w4_available(device: torch.device | str) -> bool:
    """True when the W4 kernel can run on ``device``: Triton is importable and ``device`` is an accelerator, or
    Triton's interpreter was on (``TRITON_INTERPRET=1``) when :mod:`.w4_triton` was first imported."""
    if not is_accelerator(device) and os.environ.get("TRITON_INTERPRET", "0").lower() not in _TRUE:
        return False  # CPU without the interpreter: do not import Triton at all
    from . import w4_triton

    return w4_triton.available(device)


__all__ = ["w4_group_size", "w4_available", "W4_MIN_GROUP", "W4_DTYPES"]
