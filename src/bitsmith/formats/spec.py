"""QuantSpec: a number format + a granularity + a scale constraint, and the tensor functions built on them.

This is the one code path every algorithm uses (RTN, GPTQ, LWC, activation and KV quantization): reshape to
blocks ``(rows, n_groups, group_len)``, reduce over the last axis, quantize, reshape back.

Scale constraints (ZeroQuant-FP, arXiv 2307.09782 §4, for FP4 weights that must cast to FP8 exactly):

* ``m1``: each block scale rounded **up** to a power of two, ``s' = 2^⌈log2 s⌉`` (up, so nothing overflows).
* ``m2``: one real scale per row ``S = max_g s_g`` and per-group power-of-two shifts
  ``s'_g = S · 2^−k_g`` with ``k_g = min(⌊log2(S / s_g)⌋, MAX_POW2_SHIFT)`` (floor, so ``s'_g ≥ s_g``).

With either, ``codes · 2^−k`` (M2) or ``codes · 2^e`` (M1, relative to the row's largest exponent) is a pure
exponent shift of an E2M1 value, which E4M3 represents exactly while the shift stays within
``MAX_POW2_SHIFT = 8`` (the smallest E2M1 magnitude 0.5 · 2^−8 = 2^−9 is E4M3's smallest subnormal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .base import NumberFormat
from .granularity import Granularity, PerChannel, PerGroup, PerToken
from .learned import learned_fake_quant
from .ste import ste

SCALE_CONSTRAINTS = ("none", "m1", "m2")
MAX_POW2_SHIFT = 8


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(s)))


def constrain_scale(scale: torch.Tensor, constraint: str) -> torch.Tensor:
    """Apply a scale constraint to block scales ``(rows, G, 1)``; straight-through in the backward pass."""
    if constraint == "none":
        return scale
    if constraint == "m1":
        return ste(scale, _pow2_ceil)
    if constraint == "m2":
        def m2(s: torch.Tensor) -> torch.Tensor:
            row = s.amax(dim=1, keepdim=True)
            k = torch.floor(torch.log2(row / s)).clamp(0, MAX_POW2_SHIFT)
            return row * torch.exp2(-k)

        return ste(scale, m2)
    raise ConfigError(f"unknown scale constraint {constraint!r}; use one of {', '.join(SCALE_CONSTRAINTS)}")


@dataclass
class QuantizedTensor:
    """Frozen quantization of a tensor: integer ``codes`` (same shape as the original), block ``scale`` and
    ``zero`` of shape ``(rows, n_groups)`` (``zero`` is None for symmetric/FP formats), and the spec."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: "QuantSpec" = field(repr=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Real values, shape ``codes.shape``."""
        return self.spec.dequantize(self.codes, self.scale, self.zero, dtype)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: ``format`` (what a code means), ``granularity`` (which elements share a
    scale) and ``scale_constraint`` (``none``, ``m1``, ``m2``; FP formats only)."""

    format: NumberFormat
    granularity: Granularity = PerChannel()
    scale_constraint: str = "none"

    def __post_init__(self) -> None:
        if self.scale_constraint not in SCALE_CONSTRAINTS:
            raise ConfigError(
                f"unknown scale constraint {self.scale_constraint!r}; use one of {', '.join(SCALE_CONSTRAINTS)}"
            )
        sub = self.format.sub_block  # K-quants: the sub-block is the group
        if sub is not None and self.granularity != PerGroup(sub):
            raise ConfigError(f"{self.format.name} quantizes sub-blocks of {sub} weights; use groups of {sub} "
                             f"(drop --group-size), not {self.granularity.kind}")
        if self.scale_constraint != "none" and not self.format.is_float:
            raise ConfigError(
                f"scale constraint {self.scale_constraint} applies to FP weight formats (e.g. e2m1), "
                f"not {self.format.name}; drop --scale-constraint or choose an FP format"
            )

    # ---- statistics and qparams ----------------------------------------------------------------------
    def block_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block minimum and maximum, each ``(rows, G, 1)``."""
        xg = self.granularity.to_groups(x)
        return xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)

    def qparams(
        self,
        x: torch.Tensor,
        clip_min: torch.Tensor | None = None,
        clip_max: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block scale and zero point ``(rows, G, 1)`` for ``x``.

        ``clip_min``/``clip_max`` are OmniQuant LWC strengths in [0, 1] (σ(β), σ(γ), arXiv 2308.13137
        Eq. 2), broadcast against ``(rows, G, 1)``: the range becomes ``[σ(β)·min, σ(γ)·max]``.
        """
        xmin, xmax = self.block_minmax(x)
        if clip_min is not None:
            xmin = xmin * clip_min
        if clip_max is not None:
            xmax = xmax * clip_max
        scale, zero = self.format.qparams(xmin, xmax)
        return constrain_scale(scale, self.scale_constraint), zero

    # ---- quantize / dequantize -------------------------------------------------------------------
    def _blocks(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor | None:
        """Broadcast ``(rows, G[, 1])`` qparams to the shape of ``x``."""
        if q is None:
            return None
        if q.dim() == 2:
            q = q.unsqueeze(-1)
        return self.granularity.expand(q, x.shape)

    def _offset(self, x: torch.Tensor, s: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """``x`` moved by ``offset`` grid steps (learned rounding, SignRound arXiv 2309.05516 Eq. 2:
        ``round(x / s + V)``; for FP formats the step is the local one, :meth:`NumberFormat.grid_step`)."""
        if offset is None:
            return x
        if self.format.unit_grid:  # a grid step of 1 everywhere (integer grids): the same values, two ops fewer
            return x + offset * s
        return x + offset * self.format.grid_step((x / s).detach()) * s

    def fake_quant(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Differentiable quantize-dequantize of ``x`` (any shape); qparams computed when not given.
        ``offset`` (shape of ``x``): rounding offsets in grid steps added before rounding."""
        if scale is None:
            scale, zero = self.qparams(x)
        if (offset is not None and self.format.offset_in_codes and not x.requires_grad and x.dim() == 2
                and scale.dim() == 3 and torch.is_grad_enabled()):  # training learned rounding: fused
            return learned_fake_quant(x, scale, zero, offset, self.format.qmin, self.format.qmax, self.granularity)
        s = self._blocks(x, scale)
        if offset is not None and self.format.offset_in_codes:  # round(x / s + V)
            return self.format.fake_quant(x, s, self._blocks(x, zero), offset=offset)
        return self.format.fake_quant(self._offset(x, s, offset), s, self._blocks(x, zero))

    def quantize(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Freeze ``x`` into codes (after ``offset`` grid steps, as in :meth:`fake_quant`); returned qparams
        are ``(rows, G)``."""
        with torch.no_grad():
            if scale is None:
                scale, zero = self.qparams(x)
            scale = scale.reshape(scale.shape[0], -1)
            zero = None if zero is None else zero.reshape(zero.shape[0], -1)
            s = self._blocks(x, scale)
            if offset is not None and self.format.offset_in_codes:
                codes = self.format.quantize(x, s, self._blocks(x, zero), offset=offset)
            else:
                codes = self.format.quantize(self._offset(x, s, offset), s, self._blocks(x, zero))
        return QuantizedTensor(codes, scale.detach(), None if zero is None else zero.detach(), self)

    def dequantize(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Real values of ``codes`` given ``(rows, G)`` qparams."""
        s = self._blocks(codes, scale.to(dtype))
        z = self._blocks(codes, None if zero is None else zero.to(dtype))
        return self.format.dequantize(codes, s, z).to(dtype)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def validate_for(self, n_in: int, what: str = "tensor") -> None:
        """Reject a group size larger than the dimension it groups (``n_in`` elements per row)."""
        g = self.granularity
        if isinstance(g, PerGroup) and g.group_size > n_in:
            raise ConfigError(
                f"group size {g.group_size} is larger than the {n_in} input features of {what}; "
                f"use a group size ≤ {n_in} or per-channel quantization"
            )

    def to_dict(self) -> dict:
        return {
            "format": self.format.to_dict(),
            "granularity": self.granularity.to_dict(),
            "scale_constraint": self.scale_constraint,
        }


def activation_spec(fmt: NumberFormat) -> QuantSpec:
    """Dynamic per-token activation quantization with ``fmt``."""
    return QuantSpec(fmt, PerToken())
