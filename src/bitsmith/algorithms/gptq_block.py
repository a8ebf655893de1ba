"""GPTQ on a decoder block (Frantar et al., arXiv 2210.17323): the Hessians ``H = 2/N Σ x xᵀ`` of every
layer's input gathered in passes over the calibration batches, each layer solved by :func:`gptq_solve`
(:mod:`bitsmith.algorithms.gptq`), spread over the ranks under ``torch.distributed``; also GPTQ as the start
point of the reconstruction trainer. Registers the ``gptq`` method."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..formats import QuantizedTensor
from ..nn import QuantLinear, set_quant_state
from ..utils import dist
from .base import BlockForward, BlockJob, MemoryNeeds, Method, plain_outputs, register, weight_error
from .gptq import GPTQConfig, accumulate_hessian, gptq_solve

log = logging.getLogger(__name__)


@torch.no_grad()
def collect_hessians(block: nn.Module, qlinears: dict[str, QuantLinear], inputs: list[torch.Tensor],
                     kwargs: list[dict], forward: BlockForward) -> dict[str, torch.Tensor]:
    """``H = 2/N Σ x xᵀ`` of every QuantLinear's input over all calibration batches (full-precision weights;
    inputs pass through the layer's activation quantizer when it has one; under ``torch.distributed``, over
    every rank's batches: the result is the same on all ranks)."""
    acc: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in qlinears}
    hooks = []
    for name, q in qlinears.items():
        def hook(mod: QuantLinear, args: tuple, name: str = name) -> None:
            x = args[0]
            if mod.act_quantizer is not None and mod.act_quantizer.enabled:
                x = mod.act_quantizer(x)
            acc[name] = accumulate_hessian(*acc[name], x)
        hooks.append(q.register_forward_pre_hook(hook))
    set_quant_state(block, weight=False, act=True)
    try:
        for h, kw in zip(inputs, kwargs):
            forward(h, kw)
    finally:
        for hk in hooks:
            hk.remove()
    acc = _reduce_hessians(acc, qlinears)
    missing = [n for n, (hm, _) in acc.items() if hm is None]
    if missing:
        raise RuntimeError(f"no calibration input reached {', '.join(missing)}; the block's forward skipped them")
    return {n: hm for n, (hm, _) in acc.items()}


def _reduce_hessians(acc: dict[str, tuple[torch.Tensor | None, int]], qlinears: dict[str, QuantLinear]
                     ) -> dict[str, tuple[torch.Tensor | None, int]]:
    """Under ``torch.distributed``: every rank's ``H_r = 2/N_r Σ x xᵀ`` → the global ``Σ_r N_r H_r / Σ_r N_r``
    on every rank (a no-op in one process)."""
    if dist.world_size() == 1:
        return acc
    counts = dist.sum_scalars([n for _, n in acc.values()])
    out = {}
    for (name, (h, n)), total in zip(acc.items(), counts):
        if total == 0:
            out[name] = (None, 0)
            continue
        if h is None:  # this rank's share never reached the layer: it still takes part in the sum
            cols = qlinears[name].in_features
            h = torch.zeros(cols, cols, device=qlinears[name].weight.device, dtype=torch.float32)
        dist.all_reduce_sum_(h.mul_(n)).div_(total)
        out[name] = (h, int(total))
    return out


def gptq_block(block: nn.Module, qlinears: dict[str, QuantLinear], inputs: list[torch.Tensor],
               kwargs: list[dict], forward: BlockForward, cfg: GPTQConfig) -> dict[str, dict]:
    """GPTQ every layer of ``block`` from Hessians gathered in one pass over the calibration inputs
    (all layers of a block see full-precision block inputs, as in llm-compressor's sequential pipeline)."""
    stats = {}
    for name, (q, qt, loss, _) in _solve_block(block, qlinears, inputs, kwargs, forward, cfg, False).items():
        q.freeze(qt)
        stats[name] = {"weight_rel_err": weight_error(q.weight, qt), "gptq_loss": loss}
    return stats


def _solve_block(block: nn.Module, qlinears: dict[str, QuantLinear], inputs: list[torch.Tensor],
                 kwargs: list[dict], forward: BlockForward, cfg: GPTQConfig, latent: bool
                 ) -> dict[str, tuple[QuantLinear, QuantizedTensor, float, torch.Tensor | None]]:
    """GPTQ solve of every weight-quantized layer: ``name → (layer, frozen tensor, loss, error-compensated
    weights or None)``. Under torch.distributed each rank solves the layers it owns and the owner's result
    reaches every rank (one process: all owned)."""
    targets = {n: q for n, q in qlinears.items() if q.weight_quantizer is not None}
    solved = {}
    owners = dist.assign_owners({n: gptq_cost(q.out_features, q.in_features) for n, q in targets.items()})
    for names in hessian_passes({n: q.in_features for n, q in targets.items()}, cfg.hessian_mb * 2**20):
        hessians = collect_hessians(block, {n: targets[n] for n in names}, inputs, kwargs, forward)
        for name in names:
            h, q = hessians.pop(name), targets[name]
            if owners[name] == dist.rank():
                qt, loss, w = gptq_solve(q.weight, h, q.weight_quantizer.spec, cfg)
                solved[name] = (qt, loss, w if latent else None)
    return {name: (q, *_from_owner(solved.get(name), owners[name], q)) for name, q in targets.items()}


def hessian_passes(in_features: dict[str, int], budget: int) -> list[list[str]]:
    """Split layers (name → input width) into consecutive passes whose Hessians (``4·in²`` bytes each) fit
    ``budget`` bytes together (a layer larger than the budget gets a pass of its own). One pass when all fit."""
    passes: list[list[str]] = [[]]
    held = 0
    for name, cols in in_features.items():
        need = 4 * cols * cols
        if passes[-1] and held + need > budget:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += need
    return [p for p in passes if p]


def gptq_cost(out_features: int, in_features: int) -> float:
    """Relative cost of one GPTQ solve: the column sweep ``out·in²`` plus the Cholesky factorisations ``in³``."""
    return float(in_features) ** 2 * (out_features + in_features)


def _from_owner(result: tuple[QuantizedTensor, float, torch.Tensor | None] | None, owner: int, q: QuantLinear
                ) -> tuple[QuantizedTensor, float, torch.Tensor | None]:
    """Rank ``owner``'s frozen tensor, loss and optional latent weights on every rank (as is in one process)."""
    if dist.world_size() == 1:
        return result
    qt, loss, latent = result if result is not None else (None, None, None)
    parts = None if qt is None else [qt.codes, qt.scale, qt.zero, latent]
    (codes, scale, zero, latent), loss = dist.broadcast_tensors(parts, owner, q.weight.device, extra=loss)
    return (qt if qt is not None else QuantizedTensor(codes, scale, zero, q.weight_quantizer.spec)), loss, latent


def gptq_start_block(block: nn.Module, qlinears: dict[str, QuantLinear], inputs: list[torch.Tensor],
                     kwargs: list[dict], forward: BlockForward, cfg: GPTQConfig) -> dict[str, dict]:
    """Run GPTQ on every layer of ``block`` and make its result the layers' start point: each weight quantizer
    then quantizes GPTQ's error-compensated weights on GPTQ's grid (zero rounding offsets give GPTQ's codes
    exactly), for the reconstruction trainer to refine."""
    stats = {}
    for name, (q, qt, loss, latent) in _solve_block(block, qlinears, inputs, kwargs, forward, cfg, True).items():
        q.weight_quantizer.set_start(latent, qt.scale, qt.zero)
        stats[name] = {"gptq_loss": loss}
    return stats


def run_gptq(job: BlockJob, cfg: GPTQConfig) -> tuple[dict, list[torch.Tensor]]:
    """The GPTQ block driver: full-precision outputs, then every layer solved from its Hessian."""
    fp_out = plain_outputs(job)
    if not job.weight:
        return {"layers": {}}, fp_out
    return {"layers": gptq_block(job.block, job.qlinears, job.hidden, job.kwargs, job.forward, cfg)}, fp_out


GPTQ = register(Method("gptq", run_gptq, options=GPTQConfig, default=lambda act: GPTQConfig(),
                       needs=lambda cfg: MemoryNeeds(gptq=True, hessian_budget=cfg.hessian_mb * 2**20),
                       v1_key="gptq", summary="GPTQ (Hessian-based error compensation)"))
