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


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight ``(out, in)`` with ``spec``; holds LWC logits of shape ``(out, n_groups, 1)``."""

    def __init__(self, spec: QuantSpec, weight_shape: tuple[int, int], lwc: bool = False,
                 lwc_init: float = LWC_INIT, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weight_shape = tuple(weight_shape)
        spec.validate_for(self.weight_shape[-1])
        self.gamma: nn.Parameter | None = None
        self.beta: nn.Parameter | None = None
        if lwc:
            self.enable_lwc(lwc_init, device)

    def enable_lwc(self, init: float = LWC_INIT, device: torch.device | str | None = None) -> None:
        """Create the LWC logits γ (max side) and β (min side), one per quantization block."""
        rows, groups = self.spec.granularity.to_groups(torch.empty(self.weight_shape, device="meta")).shape[:2]
        self.gamma = nn.Parameter(torch.full((rows, groups, 1), float(init), device=device))
        self.beta = nn.Parameter(torch.full((rows, groups, 1), float(init), device=device))

    @property
    def has_lwc(self) -> bool:
        return self.gamma is not None

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block scale/zero ``(rows, G, 1)``, through the LWC clipping strengths when present."""
        if self.gamma is None:
            return self.spec.qparams(w)
        return self.spec.qparams(w, clip_min=torch.sigmoid(self.beta), clip_max=torch.sigmoid(self.gamma))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams(w)
        return self.spec.fake_quant(w, scale, zero)

    @torch.no_grad()
    def freeze(self, w: torch.Tensor) -> QuantizedTensor:
        """Integer codes and fixed qparams of ``w`` under the current (possibly learned) clipping."""
        scale, zero = self.qparams(w)
        return self.spec.quantize(w, scale, zero)

    def extra_repr(self) -> str:
        return f"{self.spec.format.name}, {self.spec.granularity}, lwc={self.has_lwc}"


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
