"""Round-to-nearest: each weight quantized independently with min/max (or absmax) block qparams."""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, QuantSpec
from ..nn import QuantLinear
from .base import BlockJob, Method, plain_outputs, register, weight_error


@torch.no_grad()
def rtn_quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Frozen round-to-nearest quantization of ``w (out, in)`` under ``spec``."""
    return spec.quantize(w.detach().float())


def rtn_block(qlinears: dict[str, QuantLinear], **_: object) -> dict[str, dict]:
    """Round-to-nearest every layer (LWC logits, if any, are applied as they stand)."""
    stats = {}
    for name, q in qlinears.items():
        if q.weight_quantizer is None:
            continue
        qt = q.freeze(None if not q.weight_quantizer.is_plain else rtn_quantize(q.weight, q.weight_quantizer.spec))
        stats[name] = {"weight_rel_err": weight_error(q.weight, qt)}
    return stats


def run_rtn(job: BlockJob, options: None) -> tuple[dict, list[torch.Tensor]]:
    """The RTN block driver: full-precision outputs, then every layer rounded to nearest."""
    fp_out = plain_outputs(job)
    return {"layers": rtn_block(job.qlinears) if job.weight else {}}, fp_out


RTN = register(Method("rtn", run_rtn, summary="round to nearest (min/max qparams)"))
