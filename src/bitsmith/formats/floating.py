"""Floating-point ExMy formats with the OCP conventions (FP8 E4M3/E5M2, FP6 E3M2/E2M3, FP4 E2M1).

A code is ``sign | exponent (E bits) | mantissa (M bits)`` with exponent bias ``2^(E−1) − 1``. Three
conventions for the top exponent:

* ``ieee`` (E5M2): the all-ones exponent encodes inf/NaN; max = (2 − 2^−M) · 2^(2^E − 2 − bias) = 57344.
* ``fn``   (E4M3, "finite, one NaN"): only the all-ones code S.1111.111 is NaN; max = 1.75 · 2^8 = 448.
* ``none`` (MX FP6/FP4): every code is finite; E2M1 max = 6, E3M2 max = 28, E2M3 max = 7.5.

Rounding is round-to-nearest-even with subnormals; values beyond ±max **saturate** to ±max (hardware
convert-with-saturation). Within range this matches ``tensor.to(torch.float8_e4m3fn)`` bit for bit.

The block scale is symmetric absmax scaling (ZeroQuant-FP, arXiv 2307.09782 §3): ``s = absmax / max``,
``x̂ = round_fp(x / s) · s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import NumberFormat, scale_floor
from .ste import ste

_CONVENTIONS = ("ieee", "fn", "none")
_NATIVE = {(4, 3, "fn"): torch.float8_e4m3fn, (5, 2, "ieee"): torch.float8_e5m2}  # torch dtypes of equal grids


@dataclass(frozen=True, repr=False)
class FPFormat(NumberFormat):
    """ExMy floating-point format; ``convention`` is one of ``ieee``, ``fn``, ``none`` (see module docstring)."""

    ebits: int = 4
    mbits: int = 3
    convention: str = "fn"

    def __post_init__(self) -> None:
        if not (isinstance(self.ebits, int) and isinstance(self.mbits, int)):
            raise ConfigError("exponent and mantissa bit counts must be integers")
        if self.ebits < 1 or self.mbits < 0 or not 3 <= 1 + self.ebits + self.mbits <= 8:
            raise ConfigError(
                f"unsupported FP format e{self.ebits}m{self.mbits}: need ≥1 exponent bit and 3–8 bits in all; "
                "use e4m3, e5m2, e3m2, e2m3 or e2m1"
            )
        if self.convention not in _CONVENTIONS:
            raise ConfigError(f"unknown FP convention {self.convention!r}; use one of {', '.join(_CONVENTIONS)}")

    # ---- derived constants -------------------------------------------------------------------------
    @property
    def bits(self) -> int:  # type: ignore[override]
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share it)."""
        return 1 - self.bias

    @property
    def max_value(self) -> float:
        top = 2**self.ebits - 1 - self.bias
        if self.convention == "ieee":
            return (2 - 2.0**-self.mbits) * 2.0 ** (top - 1)
        if self.convention == "fn":
            return (2 - 2.0 ** (1 - self.mbits)) * 2.0**top
        return (2 - 2.0**-self.mbits) * 2.0**top

    @property
    def name(self) -> str:
        return f"e{self.ebits}m{self.mbits}"

    @property
    def is_float(self) -> bool:
        return True

    @property
    def has_zero_point(self) -> bool:
        return False

    # ---- value-domain rounding -------------------------------------------------------------------
    def round_to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest representable value of ``v`` (round half to even, subnormals, saturation at ±max).

        Exact in fp32: the step ``2^(e − M)`` is a power of two, so ``|v| / step`` is exact and
        ``torch.round`` rounds half to even.
        """
        native = _NATIVE.get((self.ebits, self.mbits, self.convention))
        if native is not None and v.dtype in (torch.float32, torch.float16, torch.bfloat16):
            # the same rounding (RNE, subnormals) by torch's own cast, several times faster; within ±max it is
            # exact (tests compare it with the arithmetic path below)
            return v.clamp(-self.max_value, self.max_value).to(native).to(v.dtype)
        return self.round_arithmetic(v)

    def round_arithmetic(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`round_to_grid` by arithmetic (any format): ``round(|v| / step) · step`` with the local step."""
        a = v.abs().clamp(max=self.max_value)
        step = self.grid_step(a)  # frexp: a = m · 2^e, m in [0.5, 1), leading bit 2^(e − 1)
        return torch.copysign(torch.round(a / step) * step, v)

    unit_grid = False

    def grid_step(self, v: torch.Tensor) -> torch.Tensor:
        """Spacing ``2^(e − M)`` of the grid around ``v`` (the step :meth:`round_to_grid` rounds with)."""
        a = v.detach().abs().clamp(max=self.max_value)
        _, e = torch.frexp(a)
        return torch.ldexp(torch.ones_like(a), torch.clamp(e - 1, min=self.emin) - self.mbits)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Bit patterns (uint8, low ``bits`` bits used) of on-grid values ``q``."""
        sign = torch.signbit(q).to(torch.int32)
        a = q.abs().float()
        _, e = torch.frexp(a)
        e = (e - 1).to(torch.int32)
        normal = a >= 2.0**self.emin
        exp_field = torch.where(normal, e + self.bias, torch.zeros_like(e))
        frac = torch.where(normal, torch.ldexp(a, -e) - 1.0, a / 2.0**self.emin)
        mant = torch.round(frac * 2**self.mbits).to(torch.int32)
        code = (sign << (self.ebits + self.mbits)) | (exp_field << self.mbits) | mant
        return code.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 values of bit patterns ``codes`` (NaN/inf codes decode to NaN/inf)."""
        c = codes.to(torch.int32)
        mmask = (1 << self.mbits) - 1
        emask = (1 << self.ebits) - 1
        mant = (c & mmask).float()
        exp_field = (c >> self.mbits) & emask
        sign = torch.where(((c >> (self.ebits + self.mbits)) & 1) == 1, -1.0, 1.0)
        normal = exp_field > 0
        e = torch.where(normal, exp_field - self.bias, torch.full_like(exp_field, self.emin))
        frac = torch.where(normal, 1.0 + mant / 2**self.mbits, mant / 2**self.mbits)
        val = sign * torch.ldexp(frac, e)
        if self.convention == "ieee":
            top = exp_field == emask
            val = torch.where(top & (mant == 0), sign * float("inf"), val)
            val = torch.where(top & (mant != 0), float("nan"), val)
        elif self.convention == "fn":
            val = torch.where((exp_field == emask) & (mant == mmask), float("nan"), val)
        return val

    # ---- NumberFormat protocol -----------------------------------------------------------------------
    def qparams(self, xmin, xmax):
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        return (absmax / self.max_value).clamp(min=scale_floor(xmin.dtype)), None

    def quantize(self, x, scale, zero):
        return self.encode(self.round_to_grid((x / scale).float()))

    def dequantize(self, codes, scale, zero):
        return self.decode(codes).to(scale.dtype) * scale

    def fake_quant(self, x, scale, zero):
        v = torch.clamp(x / scale, -self.max_value, self.max_value)
        return ste(v, self.round_to_grid) * scale

    def to_dict(self) -> dict:
        return {"type": "fp", "ebits": self.ebits, "mbits": self.mbits, "convention": self.convention}


E4M3 = FPFormat(4, 3, "fn")
E5M2 = FPFormat(5, 2, "ieee")
E3M2 = FPFormat(3, 2, "none")
E2M3 = FPFormat(2, 3, "none")
E2M1 = FPFormat(2, 1, "none")
