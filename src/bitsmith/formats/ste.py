"""Straight-through estimators shared by all formats.

Rounding has zero gradient almost everywhere; the straight-through estimator (Bengio et al. 2013, used by
OmniQuant's LWC, Eq. 2) passes the gradient of the identity instead, so fake quantization stays trainable.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass; identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def ste(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` in the forward pass and pass the gradient of the identity backwards."""
    return x + (fn(x) - x).detach()
