"""OmniQuant (Shao et al., arXiv 2308.13137): LWC + LET trained block by block, then folded.

A recipe of :mod:`bitsmith.algorithms.reconstruct` (not a second training loop). Defaults are the official
code's: LWC logits start at 4.0 (σ ≈ 0.982), ``lwc_lr`` 1e-2, ``let_lr`` 5e-3 (the paper's text swaps them;
the code is what produced its tables), AdamW without weight decay, α = 0.5 SmoothQuant-style LET init, 20 epochs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..nn import QuantLinear
from ..transforms import ChannelStats, Edge, fold_edges, init_edge
from .block import weight_error
from .reconstruct import BlockForward, ParamGroup, TrainConfig, eval_loss, train_with_retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OmniQuantConfig:
    """OmniQuant options (names follow the official ``main.py``)."""

    lwc: bool = True
    let: bool = False
    epochs: int = 20
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    weight_decay: float = 0.0
    aug_loss: bool = False
    alpha: float = 0.5
    let_qk: bool = True
    let_up_down: bool = False
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.epochs > 0 and not (self.lwc or self.let):
            raise ValueError("OmniQuant training needs --lwc and/or --let (or --epochs 0 for initialisation only)")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if self.lwc_lr <= 0 or self.let_lr <= 0:
            raise ValueError(f"learning rates must be positive, got lwc_lr={self.lwc_lr}, let_lr={self.let_lr}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}; the official default is 0.5")

    @property
    def train(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, weight_decay=self.weight_decay, aug_loss=self.aug_loss,
                           keep_best=self.keep_best)


def omniquant_block(block_name: str, qlinears: dict[str, QuantLinear], edges: list[Edge],
                    edge_stats: dict[str, ChannelStats], q_inputs: list[torch.Tensor],
                    targets: list[list[torch.Tensor]], kwargs: list[dict], forward: BlockForward,
                    cfg: OmniQuantConfig) -> dict:
    """Initialise LET from ``edge_stats``, train LWC/LET against ``targets``, fold LET, freeze every layer.

    ``q_inputs[b]`` ``(b, T, H)``: inputs from the quantized prefix; ``targets[b]``: full-precision outputs
    (and, with ``aug_loss``, the full-precision block applied to ``q_inputs[b]``). Returns block statistics
    with per-layer entries under ``"layers"``.
    """
    groups = []
    if cfg.let and edges:
        for e in edges:
            st = edge_stats.get(e.name)
            init_edge(e, None if st is None else st.absmax, cfg.alpha, None if st is None else st.mid_ema)
            e.register()
        groups.append(ParamGroup("let", [p for e in edges for p in e.parameters()], cfg.let_lr))
    if cfg.lwc:
        lwc = [p for q in qlinears.values() if q.weight_quantizer is not None and q.weight_quantizer.has_lwc
               for p in (q.weight_quantizer.gamma, q.weight_quantizer.beta)]
        groups.append(ParamGroup("lwc", lwc, cfg.lwc_lr))
    before = eval_loss(forward, q_inputs, targets, kwargs)
    history = train_with_retry(block_name, forward, groups, q_inputs, targets, kwargs, cfg.train)
    after = eval_loss(forward, q_inputs, targets, kwargs)
    if cfg.let and edges:
        fold_edges(edges)
    layers = {}
    for name, q in qlinears.items():
        if q.weight_quantizer is not None:
            layers[name] = {"weight_rel_err": weight_error(q.weight, q.freeze())}
    log.debug("%s: reconstruction loss %.4g → %.4g", block_name, before, after)
    return {"loss_init": before, "loss_final": after, "epoch_losses": history, "layers": layers}
