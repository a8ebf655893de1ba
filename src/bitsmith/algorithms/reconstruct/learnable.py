"""Learnable parameter groups of the block-reconstruction trainer (:mod:`bitsmith.algorithms.reconstruct`).

Each group switches its state on in the block's quantizers or edges when built (``init``), exposes the tensors
to train (``parameters``), keeps them in their domain after a step (``project``) and makes the result permanent
(``fold``). After folding, freezing a layer (:meth:`QuantLinear.freeze`) gives the final codes, so every group
folds exactly: the folded block computes what the reparametrised block computed.

* :class:`ClipGroup`: per-block clipping strengths of the min/max range: OmniQuant's LWC (sigmoid of logits
  initialised at 4, arXiv 2308.13137 Eq. 2) or SignRound's min/max scales (used directly, initialised at 1,
  kept in [0, 1]; arXiv 2309.05516).
* :class:`LETGroup`: OmniQuant's equivalent transformation (channel scales/shifts, Q/K scale; Eq. 3–5),
  initialised SmoothQuant-style from activation statistics and folded into the neighbouring weights.
* :class:`RoundingGroup`: per-element rounding offsets ``V`` in grid steps, kept in [−0.5, 0.5]
  (SignRound Eq. 2 ``round(W / s + V)``, AdaRound family); zero offsets are round-to-nearest.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn import QuantLinear
from ...nn.quantizer import LWC_INIT, WeightQuantizer
from ...transforms import ChannelStats, Edge, fold_edges, init_edge

CLIP_INIT = {"sigmoid": LWC_INIT, "linear": 1.0}


def _quantizers(qlinears: dict[str, QuantLinear]) -> list[tuple[QuantLinear, WeightQuantizer]]:
    return [(q, q.weight_quantizer) for q in qlinears.values() if q.weight_quantizer is not None]


@torch.no_grad()
def search_clip(wq: WeightQuantizer, w: torch.Tensor, lowest: float = 0.4, candidates: int = 31,
                norm: float = 2.4) -> torch.Tensor:
    """Per-block shrink factor ``p`` ``(rows, G, 1)`` of the min/max range minimising ``Σ |Q(W) − W|^norm``
    over ``candidates`` values from 1 down to ``lowest`` (the GPTQ reference's ``mse`` grid search, used
    here to start clipping strengths closer to their optimum)."""
    spec = wq.spec
    best_p = best_e = None
    for p in torch.linspace(1.0, lowest, candidates, device=w.device):
        scale, zero = spec.qparams(w, clip_min=p, clip_max=p)
        err = spec.granularity.to_groups((spec.fake_quant(w, scale, zero) - w).abs().pow(norm)).sum(-1, True)
        if best_e is None:
            best_p, best_e = torch.ones_like(err), err
        better = err < best_e
        best_p = torch.where(better, p, best_p)
        best_e = torch.where(better, err, best_e)
    return best_p


class ClipGroup:
    """Clipping strengths ``(rows, G, 1)`` for every quantized weight of the block; ``init="mse"`` starts the
    (linear) strengths at :func:`search_clip`'s factors instead of 1."""

    def __init__(self, qlinears: dict[str, QuantLinear], lr: float, param: str = "sigmoid",
                 name: str = "clip", init: str = "minmax") -> None:
        self.name, self.lr, self.param = name, lr, param
        self.params: list[nn.Parameter] = []
        for q, wq in _quantizers(qlinears):
            wq.enable_lwc(CLIP_INIT[param], q.weight.device, param=param)
            if init == "mse" and param == "linear":
                p = search_clip(wq, q.weight.detach().float())
                wq.gamma.data.copy_(p)
                wq.beta.data.copy_(p)
            self.params += [wq.gamma, wq.beta]

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def project(self) -> None:
        if self.param == "linear":
            for p in self.params:
                p.data.clamp_(0.0, 1.0)

    def fold(self) -> None:
        """Nothing to move: freezing reads the learned strengths."""


class RoundingGroup:
    """Rounding offsets ``(out, in)`` for every quantized weight of the block, starting at zero."""

    def __init__(self, qlinears: dict[str, QuantLinear], lr: float, name: str = "rounding") -> None:
        self.name, self.lr = name, lr
        self.params: list[nn.Parameter] = []
        for q, wq in _quantizers(qlinears):
            wq.enable_rounding(q.weight.device)
            self.params.append(wq.offset)

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def project(self) -> None:
        for p in self.params:
            p.data.clamp_(-0.5, 0.5)

    def fold(self) -> None:
        """Nothing to move: freezing rounds with the learned offsets."""


class LETGroup:
    """Equivalence edges of the block, registered as parametrisations of the weights they touch.
    ``optimizer``: this group's optimizer when it differs from the trainer's (None: the trainer's)."""

    def __init__(self, edges: list[Edge], stats: dict[str, ChannelStats], alpha: float, lr: float,
                 name: str = "let", optimizer: str | None = None) -> None:
        self.name, self.lr, self.edges, self.optimizer = name, lr, edges, optimizer
        for e in edges:
            st = stats.get(e.name)
            init_edge(e, None if st is None else st.absmax, alpha, None if st is None else st.mid_ema)
            e.register()
        self.params = [p for e in edges for p in e.parameters()]

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def project(self) -> None:
        pass

    def fold(self) -> None:
        """Fold every scale/shift into the weights and biases (the same formula as training's)."""
        fold_edges(self.edges)
