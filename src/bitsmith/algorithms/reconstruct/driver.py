"""The block driver shared by every learned method (bitsmith's default, AutoRound, OmniQuant): full-precision
targets (and LET statistics) from the full-precision chain, an optional GPTQ start, then the reconstruction
trainer (:func:`~bitsmith.algorithms.reconstruct.recipe.reconstruct_block`)."""

from __future__ import annotations

import torch

from ...nn import set_quant_state
from ...transforms import collect_input_stats
from ..base import BlockJob, MemoryNeeds
from ..gptq_block import gptq_start_block
from .recipe import ReconstructConfig, reconstruct_block


def run_reconstruct(job: BlockJob, rc: ReconstructConfig) -> tuple[dict, list[torch.Tensor]]:
    """Train ``rc``'s parameter groups on ``job``'s block against the full-precision block's outputs on the
    full-precision chain's inputs (OmniQuant's targets; ``aug_loss`` adds the full-precision block on the
    quantized inputs). Returns (statistics, full-precision outputs)."""
    edges, consumers = [], {}
    if rc.let:
        edges, consumers = job.edges(shift=job.act, qk=rc.let_qk, up_down=rc.let_up_down)
    with collect_input_stats(consumers) as edge_stats:
        fp_out = job.outputs(job.fp_hidden if job.fp_hidden is not None else job.hidden)
    targets = [[t] for t in fp_out]
    if rc.aug_loss:
        for t, extra in zip(targets, job.outputs(job.hidden)):
            t.append(extra)
    job.block.requires_grad_(False)
    if rc.start == "gptq" and job.weight:
        gptq_start_block(job.block, job.qlinears, job.hidden, job.kwargs, job.forward, rc.gptq)
    if not job.weight:  # no weight quantizers: only LET (for activation quantization) can learn
        rc = rc.replace(clip="none", rounding=False)
    set_quant_state(job.block, weight=job.weight, act=job.act or job.kv)
    stats = reconstruct_block(job.name, job.qlinears, edges, edge_stats, job.hidden, targets, job.kwargs,
                              job.forward, rc)
    return stats, fp_out


def reconstruct_needs(rc: ReconstructConfig) -> MemoryNeeds:
    """Memory needs of training with ``rc`` (after an optional GPTQ start, whose workspace is freed first)."""
    return MemoryNeeds(gptq=rc.start == "gptq", hessian_budget=rc.gptq.hessian_mb * 2**20, trained=True,
                       rounding=rc.rounding, batch=rc.batch, aug_loss=rc.aug_loss)
