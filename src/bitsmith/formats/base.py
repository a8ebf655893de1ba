"""The number-format protocol shared by integer and floating-point formats.

A format says what a code means; it knows nothing about which elements share a scale (that is the
granularity's job, see :mod:`bitsmith.formats.granularity`). All functions take block statistics or qparams
shaped ``(rows, n_groups, 1)`` and tensors that broadcast against them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def scale_floor(dtype: torch.dtype) -> float:
    """Smallest scale allowed: keeps ``x / scale`` finite for an all-zero block (larger for 16-bit dtypes)."""
    return 1e-5 if dtype in (torch.float16, torch.bfloat16) else 1e-9


class NumberFormat(ABC):
    """A quantized number format: ``bits`` per code, a code grid, and how a block's range maps onto it."""

    bits: int
    #: Weights per sub-block for formats whose grid is defined on fixed blocks (llama.cpp's K-quants: the spec's
    #: group size is this, their zero point is real-valued and their scales are quantized together); None otherwise.
    sub_block: int | None = None

    @property
    @abstractmethod
    def name(self) -> str:
        """Canonical short name, e.g. ``int4``, ``uint3``, ``e4m3``."""

    @property
    @abstractmethod
    def is_float(self) -> bool:
        """True for ExMy floating-point formats."""

    @property
    @abstractmethod
    def has_zero_point(self) -> bool:
        """True when the format stores a zero point per block (asymmetric integers)."""

    @abstractmethod
    def qparams(
        self, xmin: torch.Tensor, xmax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and zero point, or None) from block minima and maxima ``(rows, G, 1)``.

        Differentiable in ``xmin``/``xmax`` (the zero point uses a straight-through round), which is what
        OmniQuant's learnable weight clipping trains through (arXiv 2308.13137, Eq. 2).
        """

    @abstractmethod
    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Codes (integer tensor) of ``x``; ``scale``/``zero`` broadcast against ``x``."""

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Real values of ``codes`` (float32, or the dtype of ``scale``)."""

    @abstractmethod
    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """``dequantize(quantize(x))`` computed differentiably (straight-through rounding)."""

    unit_grid = True  # grid_step is 1 everywhere (formats with a non-uniform grid set False)
    # True: fake_quant/quantize take ``offset`` (grid steps) themselves, added to x / scale before rounding
    offset_in_codes = False

    def grid_step(self, v: torch.Tensor) -> torch.Tensor:
        """Distance between neighbouring codes around the scaled value ``v`` (``x / scale``): 1 for integer
        grids, ``2^(e − M)`` in an FP format's binade. Learned rounding offsets are measured in this unit."""
        return torch.ones_like(v)

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-serialisable description; :func:`bitsmith.formats.format_from_dict` inverts it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
