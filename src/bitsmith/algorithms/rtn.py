"""Round-to-nearest: each weight quantized independently with min/max (or absmax) block qparams."""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, QuantSpec


@torch.no_grad()
def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Frozen round-to-nearest quantization of ``w (out, in)`` under ``spec``."""
    return spec.quantize(w.detach().float())
