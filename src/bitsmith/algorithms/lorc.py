"""LoRC, low-rank compensation of the weight quantization error (ZeroQuant-V2, arXiv 2303.08302 §5; reused by
ZeroQuant-FP, arXiv 2307.09782).

After a layer's weight ``W (out, in)`` is frozen to ``Ŵ``, the error ``E = W − Ŵ`` (fp32) is approximated by its
best rank-``r`` factorisation (truncated SVD, Eckart–Young)::

    E = U Σ Vᵀ,   A = U_r Σ_r^{1/2} (out, r),   B = Σ_r^{1/2} V_rᵀ (r, in),   ‖E − A·B‖²_F = Σ_{i>r} σ_i²

and the layer serves ``y = x · (Ŵ + A·B)ᵀ + b``. The factors are a separate low-rank branch: they are kept
next to the frozen codes (:class:`LoRCFactors`, exported by :class:`~bitsmith.nn.PackedLinear`), and folded into
the dense weight only for full-precision evaluation. Factors are stored either as fp16 values (``bits=None``,
accounted at :data:`FLOAT_FACTOR_BITS`) or quantized with a symmetric integer format, one scale per row of each
factor (``bits=8``: INT8, the setting ZeroQuant-V2 recommends), through the ordinary :class:`QuantSpec` API.

Storage overhead per layer: ``r·(in + out)·factor_bits`` bits (+ ``(out + r)`` scales for quantized factors), i.e.
``r·(in + out)·factor_bits / (in·out)`` extra bits per weight (:func:`lorc_extra_bits`).

:func:`lorc_block` is the one hook the pipeline calls after any weight algorithm (RTN, GPTQ, OmniQuant) has
frozen a block's layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import IntFormat, PerChannel, QuantizedTensor, QuantSpec
from ..formats.packing import storage_bits
from ..nn import QuantLinear, quant_linears

log = logging.getLogger(__name__)

FLOAT_FACTOR_BITS = 16  # unquantized factors are stored (and accounted) as fp16
FACTOR_SCALE_BITS = 16  # one fp16 scale per row of a quantized factor


@dataclass
class LoRCFactors:
    """Rank-``r`` LoRC factors of one layer, ``A (out, r)`` and ``B (r, in)``, in their stored form: fp16
    tensors, or frozen :class:`QuantizedTensor` (symmetric integer codes, scale per row)."""

    a: torch.Tensor | QuantizedTensor
    b: torch.Tensor | QuantizedTensor

    @property
    def quantized(self) -> bool:
        return isinstance(self.a, QuantizedTensor)

    @property
    def rank(self) -> int:
        return int(_shape(self.a)[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the weight they correct."""
        return int(_shape(self.a)[0]), int(_shape(self.b)[1])

    @property
    def bits(self) -> int:
        """Bits per stored factor element."""
        return self.a.spec.format.bits if self.quantized else FLOAT_FACTOR_BITS

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``A (out, r)``, ``B (r, in)`` exactly as the layer computes with them."""
        return _values(self.a), _values(self.b)

    def delta(self) -> torch.Tensor:
        """The correction ``A·B`` (out, in), fp32."""
        a, b = self.values()
        return a @ b

    def storage_bits(self, scale_bits: int = FACTOR_SCALE_BITS) -> int:
        """Logical storage of both factors: ``r·(in + out)·bits`` (+ one scale per factor row when quantized)."""
        out, n_in = self.shape
        return lorc_extra_bits(out, n_in, self.rank, self.bits if self.quantized else None, scale_bits)

    def cpu(self) -> "LoRCFactors":
        return LoRCFactors(_cpu(self.a), _cpu(self.b))


def _shape(f: torch.Tensor | QuantizedTensor) -> torch.Size:
    return f.codes.shape if isinstance(f, QuantizedTensor) else f.shape


def _values(f: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    return f.dequantize(torch.float32) if isinstance(f, QuantizedTensor) else f.float()


def _cpu(f: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
    if isinstance(f, QuantizedTensor):
        return QuantizedTensor(f.codes.cpu(), f.scale.cpu(), None if f.zero is None else f.zero.cpu(), f.spec)
    return f.cpu()


# ---- pure tensor functions -----------------------------------------------------------------------------
def lorc_extra_bits(out_features: int, in_features: int, rank: int, bits: int | None,
                    scale_bits: int = FACTOR_SCALE_BITS) -> int:
    """Storage bits LoRC adds to one ``(out, in)`` layer: ``r·(in + out)·b`` with ``b = bits`` (quantized
    factors, plus ``(out + r)`` row scales of ``scale_bits``) or ``b = 16`` (``bits=None``, fp16 factors).
    Divide by ``in·out`` for the extra bits per weight."""
    if rank == 0:
        return 0
    if bits is None:
        return storage_bits(rank * (in_features + out_features), FLOAT_FACTOR_BITS, 0)
    return storage_bits(rank * (in_features + out_features), bits, out_features + rank, scale_bits)


def factor_spec(bits: int) -> QuantSpec:
    """Symmetric ``bits``-bit integer, one scale per row: how quantized factors are stored (ZeroQuant-V2)."""
    return QuantSpec(IntFormat(bits, symmetric=True), PerChannel())


def check_rank(rank: int, out_features: int, in_features: int, name: str = "a layer") -> None:
    """Reject a rank above ``min(out, in)`` (the rank of the error matrix cannot exceed it)."""
    limit = min(out_features, in_features)
    if rank > limit:
        raise ConfigError(
            f"LoRC rank {rank} is larger than min(out, in) = {limit} of {name} ({out_features}×{in_features}); "
            f"use --lorc-rank ≤ {limit}"
        )


@torch.no_grad()
def lorc_svd(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` factors of ``error (out, in)`` (fp32, full SVD on the tensor's device; ZeroQuant-V2 LoRC):
    ``A = U_r Σ_r^{1/2} (out, r)``, ``B = Σ_r^{1/2} V_rᵀ (r, in)``, so ``‖E − A·B‖²_F = Σ_{i>r} σ_i²``."""
    check_rank(rank, *error.shape)
    u, s, vh = torch.linalg.svd(error.float(), full_matrices=False)  # u (out, k), s (k,), vh (k, in)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def make_factors(w: torch.Tensor, w_hat: torch.Tensor, rank: int, bits: int | None = None) -> LoRCFactors:
    """LoRC factors of the error ``w − w_hat`` (both ``(out, in)``), stored as fp16 (``bits=None``) or quantized
    with :func:`factor_spec` ``(bits)``."""
    a, b = lorc_svd(w.float() - w_hat.float(), rank)
    if bits is None:
        return LoRCFactors(a.half(), b.half())
    spec = factor_spec(bits)
    return LoRCFactors(spec.quantize(a), spec.quantize(b))


def fold(qt: QuantizedTensor, factors: LoRCFactors | None) -> torch.Tensor:
    """The dense weight the layer computes with, ``Ŵ + A·B`` (out, in), fp32."""
    w = qt.dequantize(torch.float32)
    return w if factors is None else w + factors.delta().to(w.device)


# ---- layers ---------------------------------------------------------------------------------------------
@torch.no_grad()
def apply_lorc(q: QuantLinear, rank: int, bits: int | None = None, name: str = "layer") -> dict[str, float]:
    """Attach LoRC factors to a frozen QuantLinear: stored as ``q.lorc`` (:class:`LoRCFactors`) and folded into
    the weight its frozen forward uses, so ``q(x) = act_q(x) · (Ŵ + A·B)ᵀ + b``; the frozen codes ``q.frozen``
    are unchanged. Must follow the layer's final ``freeze()`` (a later freeze drops the correction).

    Returns ``{"lorc_rel_err": ‖W − Ŵ − A·B‖² / ‖W‖²}``.
    """
    if q.frozen is None:
        raise ValueError(f"LoRC needs a frozen weight; {name} has not been quantized yet")
    check_rank(rank, q.out_features, q.in_features, name)
    w = q.weight.detach().float()
    factors = make_factors(w, q.frozen.dequantize(torch.float32).to(w.device), rank, bits)
    folded = fold(q.frozen, factors).to(w.device)
    q.set_frozen_weight(folded)
    q.lorc = factors
    err = float((w - folded).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
    return {"lorc_rel_err": err}


def lorc_block(qlinears: dict[str, QuantLinear], rank: int, bits: int | None = None) -> dict[str, dict]:
    """The pipeline hook: LoRC on every frozen layer of a block (after RTN, GPTQ or OmniQuant). Per-layer stats."""
    stats = {}
    if rank <= 0:
        return stats
    for name, q in qlinears.items():
        if q.weight_quantizer is None or q.frozen is None:
            continue
        stats[name] = apply_lorc(q, rank, bits, name)
        log.debug("%s: LoRC rank %d, rel. error → %.4g", name, rank, stats[name]["lorc_rel_err"])
    return stats


def collect_factors(root: nn.Module, prefix: str = "") -> dict[str, LoRCFactors]:
    """LoRC factors of every QuantLinear under ``root`` that has them, by qualified name, moved to the CPU."""
    pre = f"{prefix}." if prefix else ""
    return {f"{pre}{name}": q.lorc.cpu() for name, q in quant_linears(root) if getattr(q, "lorc", None) is not None}


__all__ = [
    "LoRCFactors", "FLOAT_FACTOR_BITS", "FACTOR_SCALE_BITS", "lorc_extra_bits", "factor_spec", "check_rank",
    "lorc_svd", "make_factors", "fold", "apply_lorc", "lorc_block", "collect_factors",
]
