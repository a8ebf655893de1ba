"""Fused fake quantization of a weight with learned rounding offsets on an integer grid (the training hot path).

SignRound (arXiv 2309.05516, Eq. 2) and bitsmith's default train per-weight offsets ``V`` in ``round(W / s + V)``
and per-block scales ``s`` (through OmniQuant's clipping strengths, which also set the zero point ``z``):

    c = clamp(round(W / s + V) + z, qmin, qmax),      Q(W) = (c − z) · s

Autograd through these elementwise ops keeps ~20 weight-sized temporaries per step and materialises ``s`` and
``z`` at the weight's shape; :class:`LearnedRound` computes the same forward values (the same ops on the same
values, bit for bit) on a block view ``(rows, G, g)`` with ``s``, ``z`` broadcast, and the gradients in closed form
with the straight-through estimator for ``round`` (``m``: the code was inside ``[qmin, qmax]`` before clamping):

    ∂Q/∂V = m·s,    ∂Q/∂s = (c − z) − m·W/s,    ∂Q/∂z = s·(m − 1)

(``s``, ``z`` gradients summed over each block). The weight ``W`` itself gets no gradient (callers with a
trainable ``W`` — LET — use the plain autograd path).
"""

from __future__ import annotations

import torch

from .granularity import Granularity


class LearnedRound(torch.autograd.Function):
    """``Q(W)`` above: ``x`` ``(rows, n)`` (no gradient), ``scale``/``zero`` ``(rows, G, 1)`` (``zero`` may be
    None), ``offset`` ``(rows, n)``; ``qmin``/``qmax`` the code range, ``gran`` the block layout."""

    @staticmethod
    def forward(ctx, x, scale, zero, offset, qmin: int, qmax: int, gran: Granularity):  # noqa: D102
        shape = x.shape
        xg, vg = gran.to_groups(x), _pad_zero(gran, offset)
        q = torch.round(xg / scale + vg).add_(0.0)  # as round_ste gives it (no -0.0)
        if zero is not None:
            q = q + zero
        mask = (q >= qmin) & (q <= qmax)
        c = q.clamp_(qmin, qmax)
        if zero is not None:
            c = c - zero
        ctx.save_for_backward(xg, scale, zero if zero is not None else torch.empty(0), c, mask)
        ctx.gran, ctx.shape, ctx.has_zero = gran, shape, zero is not None
        return gran.from_groups(c * scale, shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        xg, scale, zero, cz, mask = ctx.saved_tensors
        gg = _pad_zero(ctx.gran, grad.contiguous())
        gs = gg * scale
        grad_offset = ctx.gran.from_groups(torch.where(mask, gs, 0.0), ctx.shape)
        inside = torch.where(mask, xg / scale, 0.0)
        grad_scale = (gg * (cz - inside)).sum(-1, keepdim=True)
        grad_zero = -torch.where(mask, 0.0, gs).sum(-1, keepdim=True) if ctx.has_zero else None
        return None, grad_scale, grad_zero, grad_offset, None, None, None


def _pad_zero(gran: Granularity, t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(rows, n)`` as blocks ``(rows, G, g)``, a ragged last block padded with zeros (no gradient, no
    offset for the padding, which :meth:`Granularity.to_groups` fills with copies of the last element)."""
    n = t.shape[-1]
    g = gran.group_len(n)
    pad = gran.n_groups(n) * g - n
    rows = t.reshape(-1, n)
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, g)


def learned_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, offset: torch.Tensor,
                       qmin: int, qmax: int, gran: Granularity) -> torch.Tensor:
    """:class:`LearnedRound` applied (see the module docstring); ``scale``/``zero`` ``(rows, G, 1)``."""
    return LearnedRound.apply(x, scale, zero, offset, qmin, qmax, gran)
