"""Quantizer modules: weight quantizer with optional Learnable Weight Clipping, activation quantizer.

LWC (OmniQuant, arXiv 2308.13137 Eq. 2): per block (row, or row × group) two learnable logits γ, β; the
quantization range is ``[σ(β)·min(W), σ(γ)·max(W)]``. Following the official code they start at 4.0
(σ(4) ≈ 0.982: about 1.8 % clipping), and σ = 1 recovers plain min/max.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedTensor, QuantSpec

LWC_INIT = 4.0


CLIP_PARAMS = ("sigmoid", "linear")


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight ``(out, in)`` with ``spec``.

    Optional learnable state, each switched on by the parameter group that trains it:

    * clipping strengths (``gamma`` max side, ``beta`` min side), shape ``(out, n_groups, 1)``: OmniQuant's LWC
      logits through a sigmoid (``clip_param="sigmoid"``, init 4.0), or SignRound's min/max scales used
      directly and kept in [0, 1] by the trainer (``"linear"``, init 1.0);
    * rounding offsets ``offset`` ``(out, in)`` in grid steps, kept in [−0.5, 0.5] (SignRound, AdaRound family);
    * a start point (:meth:`set_start`): a weight-shaped ``start`` quantized instead of the layer's weight, on
      fixed block qparams, e.g. GPTQ's error-compensated pre-rounding weights and grid, so that zero offsets
      reproduce GPTQ's codes exactly.
    """

    def __init__(self, spec: QuantSpec, weight_shape: tuple[int, int], lwc: bool = False,
                 lwc_init: float = LWC_INIT, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weight_shape = tuple(weight_shape)
        spec.validate_for(self.weight_shape[-1])
        self.gamma: nn.Parameter | None = None
        self.beta: nn.Parameter | None = None
        self.clip_param = "sigmoid"
        self.offset: nn.Parameter | None = None
        self.register_buffer("start", None)
        self.register_buffer("fixed_scale", None)
        self.register_buffer("fixed_zero", None)
        if lwc:
            self.enable_lwc(lwc_init, device)

    def enable_lwc(self, init: float = LWC_INIT, device: torch.device | str | None = None,
                   param: str = "sigmoid") -> None:
        """Create the clipping parameters γ (max side) and β (min side), one per quantization block."""
        if param not in CLIP_PARAMS:
            raise ValueError(f"unknown clipping parametrisation {param!r}; use one of {', '.join(CLIP_PARAMS)}")
        rows, groups = self.spec.granularity.to_groups(torch.empty(self.weight_shape, device="meta")).shape[:2]
        self.clip_param = param
        self.gamma = nn.Parameter(torch.full((rows, groups, 1), float(init), device=device))
        self.beta = nn.Parameter(torch.full((rows, groups, 1), float(init), device=device))

    def enable_rounding(self, device: torch.device | str | None = None) -> None:
        """Create rounding offsets ``(out, in)`` at zero (plain round-to-nearest)."""
        self.offset = nn.Parameter(torch.zeros(self.weight_shape, device=device))

    def set_start(self, start: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Start from another algorithm's result: quantize ``start`` ``(out, in)`` (in place of the weight) on
        the fixed grid ``scale``/``zero`` (``(rows, G)`` or ``(rows, G, 1)``)."""
        self.start = start.detach().clone()
        self.fixed_scale = scale.detach().reshape(scale.shape[0], -1, 1).clone()
        self.fixed_zero = None if zero is None else zero.detach().reshape(zero.shape[0], -1, 1).clone()

    @property
    def has_lwc(self) -> bool:
        return self.gamma is not None

    @property
    def is_plain(self) -> bool:
        """True when no learnable or start state is set (plain round-to-nearest with min/max qparams)."""
        return self.gamma is None and self.offset is None and self.start is None and self.fixed_scale is None

    def strengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipping strengths (min side, max side) in [0, 1], ``(rows, G, 1)``."""
        if self.clip_param == "sigmoid":
            return torch.sigmoid(self.beta), torch.sigmoid(self.gamma)
        return self.beta, self.gamma

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block scale/zero ``(rows, G, 1)``: the fixed grid, or min/max through the clipping strengths."""
        if self.fixed_scale is not None:
            return self.fixed_scale, self.fixed_zero
        if self.gamma is None:
            return self.spec.qparams(w)
        lo, hi = self.strengths()
        return self.spec.qparams(w, clip_min=lo, clip_max=hi)

    def _start(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.start is None else self.start.to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = self._start(w)
        scale, zero = self.qparams(w)
        return self.spec.fake_quant(w, scale, zero, self.offset)

    @torch.no_grad()
    def freeze(self, w: torch.Tensor) -> QuantizedTensor:
        """Integer codes and fixed qparams of ``w`` under the current (possibly learned) state."""
        w = self._start(w)
        scale, zero = self.qparams(w)
        return self.spec.quantize(w, scale, zero, self.offset)

    def extra_repr(self) -> str:
        return (f"{self.spec.format.name}, {self.spec.granularity}, lwc={self.has_lwc}, "
                f"rounding={self.offset is not None}, start={self.start is not None}")


class ActQuantizer(nn.Module):
    """Activation fake-quantizer: dynamic (qparams from each input, e.g. per token) or static.

    Static mode uses a per-tensor scale/zero observed over calibration batches (running min/max).
    """

    def __init__(self, spec: QuantSpec, static: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.static = static
        self.enabled = True
        self.register_buffer("obs_min", None)
        self.register_buffer("obs_max", None)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate the running range of ``x`` for static quantization."""
        lo, hi = x.min().reshape(1, 1, 1).float(), x.max().reshape(1, 1, 1).float()
        self.obs_min = lo if self.obs_min is None else torch.minimum(self.obs_min, lo)
        self.obs_max = hi if self.obs_max is None else torch.maximum(self.obs_max, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.static:
            if self.obs_min is None:
                raise RuntimeError("static activation quantizer used before calibration; call observe() first")
            scale, zero = self.spec.format.qparams(self.obs_min.to(x.dtype), self.obs_max.to(x.dtype))
            return self.spec.format.fake_quant(x, scale.reshape(()), None if zero is None else zero.reshape(()))
        return self.spec.fake_quant(x)

    def extra_repr(self) -> str:
        return f"{self.spec.format.name}, {self.spec.granularity}, static={self.static}"
