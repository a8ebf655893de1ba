"""Recover codes and scales from weights that already lie on a quantization grid.

A bitsmith output folder stores each quantized linear's dequantized weight ``W = (q − z)·s`` (integer formats) or
``W = s·g`` (FP formats, ``g`` on the format's grid), rounded to the folder's dtype. :func:`fit_codes` finds, for
every scale block of ``spec``, a scale ``s`` (and zero point ``z``) under which every weight of the block is a grid
point, then the codes; the result dequantizes to ``W`` within the dtype's rounding, or the function raises. Any such
``(codes, s, z)`` is an equally valid encoding of the same weights (e.g. when a block's codes never use the extreme
levels, the original ``s`` cannot be told from another that fits), so exports built on it compute the same function.

Integer grids: the scale divides every difference between the block's distinct values (and, symmetric, every value,
since 0 is a grid point), so the smallest such difference ``d`` is ``m·s`` for a small integer ``m``; ``s = d / m``
for the smallest ``m`` whose codes fit the format's range. FP grids: the block's largest magnitude is ``s·g`` for a
positive grid value ``g``; the largest ``g`` that puts every weight on the grid wins. Each scale is then refined by
least squares over its block (``s = Σ w·c / Σ c²``), which removes most of the dtype rounding from ``d``.
"""

from __future__ import annotations

import torch

from ..errors import ExportError
from .floating import FPFormat
from .integer import IntFormat
from .spec import QuantizedTensor, QuantSpec


def _tolerance(xg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-block tolerance ``(rows, G, 1)``: a few units of the stored dtype's rounding at the block's magnitude."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 4 * eps * xg.abs().amax(-1, keepdim=True) + 1e-30


def _fit_int(xg: torch.Tensor, fmt: IntFormat, tol: torch.Tensor):
    vals = xg if fmt.has_zero_point else torch.cat([xg, torch.zeros_like(xg[..., :1])], -1)
    d = vals.sort(-1).values.diff(dim=-1)
    base = torch.where(d > tol, d, torch.full_like(d, float("inf"))).amin(-1, keepdim=True)
    amax = xg.abs().amax(-1, keepdim=True)
    const = torch.isinf(base)  # one distinct value in the block
    base = torch.where(const, torch.where(amax > 0, amax, torch.ones_like(amax)), base)
    scale = torch.full_like(base, float("nan"))
    zero = torch.zeros_like(base) if fmt.has_zero_point else None
    pending = torch.ones_like(base, dtype=torch.bool)
    for m in range(1, fmt.qmax - fmt.qmin + 1):
        s = base / m
        k = torch.round(xg / s)
        on_grid = ((k * s - xg).abs() <= torch.minimum(tol, s / 4)).all(-1, keepdim=True)
        kmin, kmax = k.amin(-1, keepdim=True), k.amax(-1, keepdim=True)
        if fmt.has_zero_point:
            z = torch.clamp(-kmin, min=0)
            fits = kmax + z <= fmt.qmax
            zero = torch.where(pending & on_grid & fits, z, zero)
        else:
            fits = (kmin >= fmt.qmin) & (kmax <= fmt.qmax)
        hit = pending & on_grid & fits
        scale = torch.where(hit, s, scale)
        pending &= ~hit
        if not pending.any():
            break
    return scale, zero


def _positive_grid(fmt: FPFormat) -> torch.Tensor:
    """The format's positive finite grid values, largest first."""
    v = fmt.decode(torch.arange(2 ** fmt.bits, dtype=torch.int32))
    v = v[torch.isfinite(v) & (v > 0)]
    return torch.unique(v).flip(0)


def _fit_fp(xg: torch.Tensor, fmt: FPFormat, tol: torch.Tensor):
    amax = xg.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, torch.full_like(amax, float("nan")), torch.ones_like(amax))
    pending = amax > 0
    for g in _positive_grid(fmt).tolist():
        if not pending.any():
            break
        s = torch.where(amax > 0, amax / g, torch.ones_like(amax))
        q = fmt.round_to_grid(xg / s)
        on_grid = ((q * s - xg).abs() <= torch.minimum(tol, fmt.grid_step(q) * s / 4)).all(-1, keepdim=True)
        hit = pending & on_grid
        scale = torch.where(hit, s, scale)
        pending &= ~hit
    return scale, None


def _refine(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Least-squares scale per block for the codes the found scale gives (same codes, less dtype rounding)."""
    fmt = spec.format
    c = fmt.dequantize(fmt.quantize(xg, scale, zero), torch.ones_like(scale), zero)  # (q − z) or g, per weight
    den = (c * c).sum(-1, keepdim=True)
    ls = (xg * c).sum(-1, keepdim=True) / den.clamp(min=1e-30)
    return torch.where((den > 0) & torch.isfinite(scale), ls, scale)


def fit_codes(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Codes, ``(rows, G)`` scales and zero points of a weight ``(out, in)`` whose values lie on ``spec``'s grid
    (within the rounding of ``weight.dtype``). ValueError when some block does not (e.g. LoRC was added, or the
    weights were edited after quantization)."""
    fmt = spec.format
    x = weight.detach().float()
    xg = spec.granularity.to_groups(x)
    tol = _tolerance(xg, weight.dtype)
    search = tol * 2 ** (fmt.bits + 1)  # a candidate scale carries the rounding of one difference, times |code|
    if isinstance(fmt, IntFormat):
        scale, zero = _fit_int(xg, fmt, search)
    elif isinstance(fmt, FPFormat):
        scale, zero = _fit_fp(xg, fmt, search)
    else:
        raise ExportError(f"cannot recover codes of format {fmt!r} from weights")
    bad = ~torch.isfinite(scale)
    if bad.any():
        raise ExportError(f"{int(bad.sum())} of {bad.numel()} scale blocks are not on the {fmt.name} "
                         f"{spec.granularity.kind} grid")
    scale = _refine(xg, scale, zero, spec)
    qt = spec.quantize(x, scale, zero)
    err = (qt.dequantize(torch.float32) - x).abs()
    limit = spec.granularity.expand(tol, x.shape)
    if (err > limit).any():
        raise ExportError(f"weights are not on the {fmt.name} {spec.granularity.kind} grid (largest difference "
                         f"{float(err.max()):.3g} after fitting)")
    return qt
