"""SmoothQuant (Xiao et al., arXiv 2211.10438): closed-form per-channel scales migrate activation outliers into
the weights (``s_j = max|X_j|^α / max|W_:,j|^(1−α)``, Eq. 4) across norm → linear edges, folded in place,
followed by round-to-nearest weights. Built on the same equivalence edges as OmniQuant's LET."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..nn import QuantLinear
from ..transforms import ChannelStats, Edge, collect_input_stats, fold_edges, init_edge
from .base import BlockJob, Method, plain_outputs, register
from .rtn import rtn_block


@dataclass(frozen=True)
class SmoothQuantConfig:
    """``alpha``: migration strength (0.5 in the paper for most models)."""

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"SmoothQuant alpha must lie in [0, 1], got {self.alpha}; the usual value is 0.5")


def smoothquant_block(qlinears: dict[str, QuantLinear], edges: list[Edge], edge_stats: dict[str, ChannelStats],
                      cfg: SmoothQuantConfig) -> dict:
    """Smooth ``edges`` from their consumers' input statistics, fold, then RTN every layer."""
    for e in edges:
        st = edge_stats.get(e.name)
        init_edge(e, None if st is None else st.absmax, cfg.alpha)
        e.register()
    fold_edges(edges)
    return {"layers": rtn_block(qlinears), "smoothed_edges": [e.name for e in edges]}


def run_smoothquant(job: BlockJob, cfg: SmoothQuantConfig) -> tuple[dict, list]:
    """The SmoothQuant block driver: norm → linear edges smoothed from the full-precision pass's input maxima."""
    edges, consumers = job.edges(shift=False, qk=False, vo=False)
    with collect_input_stats(consumers) as edge_stats:
        fp_out = plain_outputs(job)
    return smoothquant_block(job.qlinears, edges, edge_stats, cfg), fp_out


SMOOTHQUANT = register(Method("smoothquant", run_smoothquant, options=SmoothQuantConfig,
                              default=lambda act: SmoothQuantConfig(), v1_key="smoothquant",
                              summary="SmoothQuant (closed-form outlier migration, then RTN)"))
