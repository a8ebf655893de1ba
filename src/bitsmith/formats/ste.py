"""Straight-through estimators shared by all formats.

Rounding has zero gradient almost everywhere; the straight-through estimator (Bengio et al. 2013, used by
OmniQuant's LWC, Eq. 2) passes the gradient of the identity instead, so fake quantization stays trainable.
"""

from __future__ import annotations

import torch


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass; identity gradient in the backward pass. Bit for bit the value of
    ``x + (round(x) − x).detach()`` (``round(x) − x`` is exact in floating point by Sterbenz's lemma, and so is
    adding it back; that sum never yields ``-0.0``, so neither does this) in two passes over ``x`` instead of three
    and no autograd nodes for them: the weight fake-quantization of every training step runs it."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _round(x)
    return _RoundSTE.apply(x)


def _round(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` with ``-0.0`` made ``+0.0`` (in place), as ``x + (round(x) − x)`` gives it."""
    return torch.round(x).add_(0.0)


def ste(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` in the forward pass and pass the gradient of the identity backwards."""
    return x + (fn(x) - x).detach()
