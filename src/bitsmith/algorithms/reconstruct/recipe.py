"""Learned block reconstruction as a method: which parameter groups, which start point, how to train.

:class:`ReconstructConfig` is the full description; the recipes are values of it:

* ``omniquant`` (:class:`~bitsmith.algorithms.omniquant.OmniQuantConfig` converts to one): LWC + LET, AdamW,
  constant learning rates, epochs over the calibration batches in order, last parameters kept
  (arXiv 2308.13137, official code's defaults);
* ``autoround`` (:data:`bitsmith.algorithms.autoround.AUTOROUND`): SignRound reproduced (arXiv 2309.05516 /
  intel auto-round defaults): rounding offsets + min/max scales in [0, 1], signed gradient descent with lr 1/steps decaying linearly to 0,
  200 steps of 8 randomly drawn samples, parameters of the lowest mini-batch loss kept;
* ``bitsmith`` (:data:`bitsmith.algorithms.default.BITSMITH`): the default, the combination that measured best
  (README, benchmarks): SignRound's groups trained by Adam on the token-normalised loss, LET by signed steps,
  then end-to-end norm tuning (:mod:`bitsmith.algorithms.e2e`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...nn import QuantLinear
from ...transforms import ChannelStats, Edge
from ..base import weight_error
from ..e2e import EndToEndConfig
from ..gptq import GPTQConfig
from .learnable import ClipGroup, LETGroup, RoundingGroup
from .trainer import (
    OPTIMIZERS,
    BlockForward,
    TrainConfig,
    eval_loss,
    train_with_retry,
)

log = logging.getLogger(__name__)

CLIPS = ("none", "sigmoid", "linear")
STARTS = ("rtn", "gptq")


@dataclass(frozen=True)
class ReconstructConfig:
    """One block-reconstruction recipe.

    Groups: ``clip`` (``none``; ``sigmoid``: OmniQuant LWC logits; ``linear``: SignRound min/max scales),
    ``let`` (OmniQuant LET, initialised with ``alpha``; ``let_qk``/``let_up_down`` add those edges),
    ``rounding`` (learned rounding offsets); ``clip_init`` ``mse`` starts linear clipping strengths at a
    per-block grid search of the weight error instead of 1; ``clip_pow2`` False leaves the clipping of layers
    whose scales are constrained to powers of two (ZeroQuant-FP M1/M2) unlearned. ``start``: ``rtn`` or
    ``gptq`` (the block is first quantized by GPTQ, whose error-compensated weights and grid the trainer refines;
    needs ``clip`` none and no LET).
    Training: ``epochs`` passes over the calibration batches or ``steps`` optimizer steps (one of them), each
    step averaging ``batch`` batches; ``sampling``, ``optimizer``, ``schedule``, ``best``, ``eval_every``,
    ``holdout``, ``patience`` as in :class:`~bitsmith.algorithms.reconstruct.trainer.TrainConfig`. Learning rates:
    ``lr`` for the rounding offsets (None: 1/steps, SignRound's rule), ``clip_lr`` (None: ``lr``), ``let_lr``
    (trained by ``let_optimizer``, None: the same optimizer).
    ``seed``: the mini-batch sampler's seed; ``loss``: ``mse`` or ``token_mse`` (see
    :func:`~bitsmith.algorithms.reconstruct.trainer.block_loss`). ``gptq``: the GPTQ start's options. ``e2e_steps``/``e2e_lr``/``e2e_holdout``: after every
    block, tune the norms end to end (:mod:`bitsmith.algorithms.e2e`; 0 steps: off). ``aug_loss``: also match
    the full-precision block on the quantized inputs (official OmniQuant option).
    """

    clip: str = "linear"
    clip_init: str = "minmax"
    clip_pow2: bool = True
    let: bool = False
    rounding: bool = True
    start: str = "rtn"
    epochs: int = 0
    steps: int = 200
    batch: int = 8
    sampling: str = "random"
    optimizer: str = "signsgd"
    schedule: str = "linear"
    lr: float | None = None
    clip_lr: float | None = None
    let_lr: float = 5e-3
    let_optimizer: str | None = None
    weight_decay: float = 0.0
    aug_loss: bool = False
    alpha: float = 0.5
    let_qk: bool = True
    let_up_down: bool = False
    best: str = "step"
    eval_every: int = 0
    holdout: int = 0
    patience: int = 0
    seed: int = 0
    loss: str = "mse"
    e2e_steps: int = 0
    e2e_lr: float = 1e-2
    e2e_holdout: int = 0
    gptq: GPTQConfig = GPTQConfig()

    def __post_init__(self) -> None:
        if self.clip not in CLIPS:
            raise ConfigError(f"unknown clip parametrisation {self.clip!r}; use one of {', '.join(CLIPS)}")
        if self.clip_init not in ("minmax", "mse") or (self.clip_init == "mse" and self.clip != "linear"):
            raise ConfigError(f"clip_init must be 'minmax' or 'mse' (mse needs clip 'linear'), got {self.clip_init!r}")
        if self.start not in STARTS:
            raise ConfigError(f"unknown start point {self.start!r}; use one of {', '.join(STARTS)}")
        if self.start == "gptq" and (self.clip != "none" or self.let):
            raise ConfigError("a GPTQ start fixes the quantization grid: use it with rounding offsets only "
                             "(clip 'none', no LET), or start from RTN")
        if self.epochs and self.steps:
            raise ConfigError(f"give epochs or steps, not both (got epochs={self.epochs}, steps={self.steps})")
        for name in ("lr", "clip_lr", "let_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        if self.let_optimizer not in (None, *OPTIMIZERS):
            raise ConfigError(f"unknown let_optimizer {self.let_optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}")
        self.train(1)  # validates the training fields
        self.end_to_end()

    @property
    def learns(self) -> bool:
        """True when any parameter group is trained."""
        return self.clip != "none" or self.let or self.rounding

    def total_steps(self, units: int) -> int:
        """Optimizer steps for ``units`` calibration batches on this process (epochs × passes)."""
        return self.epochs * _steps_per_pass(units, self.batch) if self.epochs else self.steps

    def train(self, units: int) -> TrainConfig:
        """The trainer settings for ``units`` calibration batches."""
        return TrainConfig(steps=self.total_steps(units), batch=self.batch, sampling=self.sampling,
                           optimizer=self.optimizer, schedule=self.schedule, weight_decay=self.weight_decay,
                           best=self.best, eval_every=self.eval_every, holdout=self.holdout,
                           patience=self.patience, seed=self.seed, loss=self.loss)

    def end_to_end(self) -> EndToEndConfig | None:
        """The end-to-end norm tuning after the blocks (None when ``e2e_steps`` is 0)."""
        cfg = EndToEndConfig(steps=self.e2e_steps, lr=self.e2e_lr, batch=self.batch, seed=self.seed,
                             holdout=self.e2e_holdout)
        return cfg if cfg.steps else None

    def rates(self, units: int) -> tuple[float, float]:
        """(rounding lr, clip lr): SignRound's rule lr = 1/steps when not given."""
        lr = self.lr if self.lr is not None else 1.0 / max(self.total_steps(units), 1)
        return lr, self.clip_lr if self.clip_lr is not None else lr

    def replace(self, **changes) -> "ReconstructConfig":
        return dataclasses.replace(self, **changes)


def reconstruct_block(block_name: str, qlinears: dict[str, QuantLinear], edges: list[Edge],
                      edge_stats: dict[str, ChannelStats], q_inputs: list[torch.Tensor],
                      targets: list[list[torch.Tensor]], kwargs: list[dict], forward: BlockForward,
                      cfg: ReconstructConfig) -> dict:
    """Build the parameter groups, train them against ``targets``, fold them, freeze every layer.

    ``q_inputs[b]`` ``(b, T, H)``: inputs from the quantized prefix; ``targets[b]``: full-precision outputs
    (and, with ``aug_loss``, the full-precision block applied to ``q_inputs[b]``). A GPTQ start must already be
    set on the quantizers. Returns block statistics with per-layer entries under ``"layers"``.
    """
    units = len(q_inputs)
    round_lr, clip_lr = cfg.rates(units)
    groups = []
    if cfg.let and edges:
        groups.append(LETGroup(edges, edge_stats, cfg.alpha, cfg.let_lr, optimizer=cfg.let_optimizer))
    clipped = qlinears if cfg.clip_pow2 else {n: q for n, q in qlinears.items() if not _pow2_scales(q)}
    if cfg.clip != "none" and clipped:
        groups.append(ClipGroup(clipped, clip_lr, cfg.clip, init=cfg.clip_init))
    if cfg.rounding:
        groups.append(RoundingGroup(qlinears, round_lr))
    tcfg = cfg.train(units)
    # with best="eval" over all units the trainer itself evaluates the loss before training and at the kept step
    reuse = tcfg.best == "eval" and not tcfg.holdout and tcfg.steps > 0 and any(g.parameters() for g in groups)
    before = None if reuse else eval_loss(forward, q_inputs, targets, kwargs, loss=cfg.loss)
    info = train_with_retry(block_name, forward, groups, q_inputs, targets, kwargs, tcfg)
    if reuse:
        before, after = info["eval_losses"][0], min(info["eval_losses"])
    else:
        after = eval_loss(forward, q_inputs, targets, kwargs, loss=cfg.loss)
    for g in groups:
        g.fold()
    layers = {name: {"weight_rel_err": weight_error(q.weight, q.freeze())}
              for name, q in qlinears.items() if q.weight_quantizer is not None}
    log.debug("%s: reconstruction loss %.4g → %.4g (best step %d of %d)", block_name, before, after,
              info["best_step"], info["steps_run"])
    return {"loss_init": before, "loss_final": after, "epoch_losses": _pass_means(info["step_losses"], units,
                                                                                  cfg.batch),
            "best_step": info["best_step"], "steps_run": info["steps_run"], "layers": layers}


def _pow2_scales(q: QuantLinear) -> bool:
    """Whether the layer's weight scales are constrained to powers of two: a learned clipping strength then only
    matters where it crosses an octave, and its straight-through gradient points past those steps."""
    wq = q.weight_quantizer
    return wq is not None and wq.spec.scale_constraint != "none"


def _steps_per_pass(units: int, batch: int) -> int:
    """Optimizer steps in one pass over ``units`` calibration batches taken ``batch`` at a time."""
    return max(1, -(-units // min(batch, units)))


def _pass_means(losses: list[float], units: int, batch: int) -> list[float]:
    """Mean step loss per pass over the calibration batches (an epoch for OmniQuant)."""
    per = _steps_per_pass(units, batch)
    return [sum(losses[i:i + per]) / len(losses[i:i + per]) for i in range(0, len(losses), per)]
