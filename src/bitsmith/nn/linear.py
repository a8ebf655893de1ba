"""QuantLinear: a drop-in replacement for ``nn.Linear`` that quantizes its weight and (optionally) its input.

Lifecycle (one state at a time, each transition one method):

``float``  → weight used as is (quantization off; computes full-precision targets)
``fake``   → weight fake-quantized on every forward, differentiable through W and LWC parameters
``frozen`` → integer codes + fixed qparams stored; forward uses their dequantized value

Packing the frozen codes into bit-packed buffers is :mod:`bitsmith.nn.packed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QuantizedTensor, QuantSpec
from .quantizer import ActQuantizer, WeightQuantizer

STATES = ("float", "fake", "frozen")


class QuantLinear(nn.Module):
    """``y = act_q(x) · Ŵᵀ + b``; x ``(..., in)``, W ``(out, in)``, y ``(..., out)``."""

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec | None, act_spec: QuantSpec | None = None,
                 lwc: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = (
            WeightQuantizer(weight_spec, tuple(linear.weight.shape), lwc=lwc, device=linear.weight.device)
            if weight_spec is not None else None
        )
        self.act_quantizer = ActQuantizer(act_spec) if act_spec is not None else None
        self.state = "fake" if weight_spec is not None else "float"
        self.frozen: QuantizedTensor | None = None
        self.register_buffer("_frozen_weight", None, persistent=False)

    # ---- state transitions ---------------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        """Switch between ``float`` and ``fake`` (``frozen`` is entered through :meth:`freeze`)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; use one of {STATES}")
        if state == "frozen" and self.frozen is None:
            raise ValueError("cannot enter the frozen state before freeze()")
        if state != "float" and self.weight_quantizer is None:
            raise ValueError("this layer has no weight quantizer; it can only be in the float state")
        self.state = state

    def set_act_quant(self, enabled: bool) -> None:
        """Turn input quantization on or off (no-op without an activation quantizer)."""
        if self.act_quantizer is not None:
            self.act_quantizer.enabled = enabled

    @torch.no_grad()
    def freeze(self, qt: QuantizedTensor | None = None) -> QuantizedTensor:
        """Fix integer codes: from ``qt`` (e.g. computed by GPTQ) or from the current fake quantization."""
        if self.weight_quantizer is None:
            raise ValueError("cannot freeze a layer without a weight quantizer")
        if qt is None:
            qt = self.weight_quantizer.freeze(self.weight.detach().float())
        self.frozen = qt
        self._frozen_weight = qt.dequantize(torch.float32).to(self.weight.dtype)
        self.state = "frozen"
        return qt

    @torch.no_grad()
    def set_frozen_weight(self, w: torch.Tensor) -> None:
        """Compute with ``w (out, in)`` in the frozen state while keeping the frozen codes (e.g. Ŵ + A·B for
        LoRC). A later :meth:`freeze` recomputes the weight from the codes and drops the correction."""
        if self.frozen is None:
            raise ValueError("set_frozen_weight needs a frozen layer; call freeze() first")
        self._frozen_weight = w.to(self.weight.dtype)

    # ---- forward ---------------------------------------------------------------------------------
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses in the current state, ``(out, in)``."""
        if self.state == "frozen":
            return self._frozen_weight
        if self.state == "fake":
            return self.weight_quantizer(self.weight)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        w = self.effective_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the weight this layer currently computes with (dequantized if frozen)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.effective_weight().detach())
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, state={self.state}"
