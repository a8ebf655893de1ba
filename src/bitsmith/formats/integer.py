"""Uniform integer formats, 2–8 bits, asymmetric (scale + zero point) or symmetric.

Asymmetric (GPTQ / OmniQuant convention, arXiv 2308.13137 Eq. 2)::

    s = (max − min) / (2^N − 1),   z = round(−min / s),   q = clamp(round(x / s) + z, 0, 2^N − 1)
    x̂ = (q − z) · s

The block range always contains 0 (``min ≤ 0 ≤ max``) so the zero point is itself a valid code, which packed
formats (GPTQ, compressed-tensors) require. Symmetric::

    s = max(|min|, |max|) / (2^(N−1) − 1),   q = clamp(round(x / s), −2^(N−1), 2^(N−1) − 1),   x̂ = q · s

Codes are ``uint8`` (asymmetric) or ``int8`` (symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import NumberFormat, scale_floor
from .ste import round_ste

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True, repr=False)
class IntFormat(NumberFormat):
    """``bits``-bit integer format; ``symmetric`` selects a signed grid without zero point."""

    bits: int = 4
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"integer formats support {MIN_BITS}–{MAX_BITS} bits, got {self.bits!r}; "
                "use 16 to leave a tensor unquantized"
            )

    @property
    def name(self) -> str:
        return f"{'int' if self.symmetric else 'uint'}{self.bits}"

    @property
    def is_float(self) -> bool:
        return False

    @property
    def has_zero_point(self) -> bool:
        return not self.symmetric

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def qparams(self, xmin, xmax):
        eps = scale_floor(xmin.dtype)
        if self.symmetric:
            absmax = torch.maximum(xmin.abs(), xmax.abs())
            return (absmax / self.qmax).clamp(min=eps), None
        xmin = torch.clamp(xmin, max=0.0)
        xmax = torch.clamp(xmax, min=0.0)
        scale = ((xmax - xmin) / self.qmax).clamp(min=eps)
        zero = round_ste(-xmin / scale).clamp(0, self.qmax)
        return scale, zero

    offset_in_codes = True  # learned rounding offsets are added to x / scale (see QuantSpec.fake_quant)

    def quantize(self, x, scale, zero, offset=None):
        q = torch.round(x / scale if offset is None else x / scale + offset)
        if zero is not None:
            q = q + zero
        dtype = torch.int8 if self.symmetric else torch.uint8
        return q.clamp(self.qmin, self.qmax).to(dtype)

    def dequantize(self, codes, scale, zero):
        q = codes.to(scale.dtype)
        if zero is not None:
            q = q - zero
        return q * scale

    def fake_quant(self, x, scale, zero, offset=None):
        """Quantize-dequantize ``x`` with ``round(x / scale + offset)`` (SignRound arXiv 2309.05516 Eq. 2; the
        offsets ``V`` in grid steps, straight-through rounding)."""
        q = round_ste(x / scale if offset is None else x / scale + offset)
        if zero is not None:
            q = q + zero
        q = torch.clamp(q, self.qmin, self.qmax)
        if zero is not None:
            q = q - zero
        return q * scale

    def to_dict(self) -> dict:
        return {"type": "int", "bits": self.bits, "symmetric": self.symmetric}
