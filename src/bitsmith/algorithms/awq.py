"""AWQ (Lin et al., arXiv 2306.00978): activation-aware per-channel scales found by a grid search.

For every equivalence edge (norm → linears, v → o, up → down) and α on a grid in [0, 1): ``s = mean|X|^α``
(normalised by ``sqrt(max s · min s)``), and the consumers' output error ``‖(X ⊘ s)·Q(W ⊙ s)ᵀ − X·Wᵀ‖²`` on the
calibration inputs ``X`` of the edge (AWQ §3.2, Eq. 5); the best α's scales are folded through the shared
equivalence edges and the weights are then rounded to nearest. Built on the same edges as OmniQuant's LET.

Under ``torch.distributed`` the search is data-parallel: each rank evaluates every α on its own rows of ``X``
and the mean ``|X|`` and the squared errors are summed over ranks, so every rank picks the global best α.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..nn import QuantLinear
from ..transforms import Edge, collect_inputs, fold_edges
from ..utils import dist
from .base import BlockJob, MemoryNeeds, Method, plain_outputs, register
from .rtn import rtn_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig:
    """``grid``: number of α values tried in [0, 1); ``max_tokens``: calibration rows kept per edge."""

    grid: int = 20
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.grid < 1 or self.max_tokens < 1:
            raise ConfigError(f"AWQ grid and max_tokens must be ≥ 1, got {self.grid} and {self.max_tokens}")


def _consumer_error(x: torch.Tensor, s: torch.Tensor, edge: Edge) -> float:
    """Summed squared output error of ``edge``'s consumers with scales ``s``; ``x (n, C)`` their shared input."""
    total = 0.0
    for site in edge.sites:
        if site.role != "cols_mul":
            continue
        q: QuantLinear = site.module
        if getattr(q, "weight_quantizer", None) is None:
            continue  # a full-precision consumer (an MoE router, a weight-float layer): no quantization error
        w = q.weight.detach().float()
        sc = s if site.map is None else s[site.map.to(s.device)]
        if site.index is not None:
            raise NotImplementedError("AWQ consumer sites with column subsets are not supported")
        wq = q.weight_quantizer.spec.fake_quant(w * sc)
        ref = x @ w.t()
        total += float((((x / sc) @ wq.t()) - ref).pow(2).sum())
    return total


@torch.no_grad()
def search_scale(edge: Edge, x: torch.Tensor, cfg: AWQConfig) -> tuple[torch.Tensor, float]:
    """Best scale vector of ``edge`` (length ``edge.dim``) for consumer input ``x (n, C)``; returns (s, α)."""
    cons = next(s for s in edge.sites if s.role == "cols_mul")
    rows = dist.sum_scalars([x.shape[0]])[0]  # under torch.distributed: mean and errors over all ranks' rows
    mean = dist.all_reduce_sum_(x.abs().sum(dim=0)) / max(rows, 1.0)
    if cons.map is not None:  # columns sharing a scale entry (GQA): average them
        m = cons.map.to(x.device)
        mean = torch.zeros(edge.dim, device=x.device).index_add_(0, m, mean) / torch.bincount(
            m, minlength=edge.dim).clamp(min=1)
    scales = []
    for k in range(cfg.grid):
        s = mean.clamp(min=1e-4).pow(k / cfg.grid)
        scales.append(s / (s.max() * s.min()).sqrt())
    errors = dist.sum_scalars([_consumer_error(x, s, edge) for s in scales])  # one collective per edge
    best = (float("inf"), torch.ones(edge.dim, device=x.device), 0.0)
    for k, (s, err) in enumerate(zip(scales, errors)):
        if err < best[0]:
            best = (err, s, k / cfg.grid)
    return best[1], best[2]


def awq_block(qlinears: dict[str, QuantLinear], edges: list[Edge], edge_inputs: dict[str, torch.Tensor],
              cfg: AWQConfig) -> dict:
    """Search, set and fold every edge that has calibration inputs, then RTN every layer."""
    alphas = {}
    for e in edges:
        x = edge_inputs.get(e.name)
        if x is None or not any(s.role == "cols_mul" for s in e.sites):
            continue
        s, alpha = search_scale(e, x.float(), cfg)
        e.scale.data.copy_(s)
        e.register()
        alphas[e.name] = alpha
    fold_edges([e for e in edges if e.name in alphas])
    return {"layers": rtn_block(qlinears), "awq_alpha": alphas}


def run_awq(job: BlockJob, cfg: AWQConfig) -> tuple[dict, list[torch.Tensor]]:
    """The AWQ block driver: each edge's consumers' inputs collected during the full-precision pass (this rank's
    share of ``max_tokens`` rows), the scales searched and folded, then RTN; weights left alone when they are
    not quantized."""
    if not job.weight:
        return {"layers": {}}, plain_outputs(job)
    edges, consumers = job.edges(shift=False, qk=False, up_down=True)
    h = job.hidden[0]
    rows = dist.local_row_budget(cfg.max_tokens, h.shape[1], len(job.hidden) * h.shape[0])
    with collect_inputs(consumers, rows) as edge_inputs:
        fp_out = plain_outputs(job)
    return awq_block(job.qlinears, edges, edge_inputs, cfg), fp_out


AWQ = register(Method("awq", run_awq, options=AWQConfig, default=lambda act: AWQConfig(),
                      needs=lambda cfg: MemoryNeeds(collected_tokens=cfg.max_tokens), v1_key="awq",
                      summary="AWQ (activation-aware scales, then RTN)"))
