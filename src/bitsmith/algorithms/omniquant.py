"""OmniQuant (Shao et al., arXiv 2308.13137): LWC + LET trained block by block, then folded.

A recipe of :mod:`bitsmith.algorithms.reconstruct.recipe` (:meth:`OmniQuantConfig.to_reconstruct`), not a second
training loop. Defaults are the official
code's: LWC logits start at 4.0 (σ ≈ 0.982), ``lwc_lr`` 1e-2, ``let_lr`` 5e-3 (the paper's text swaps them;
the code is what produced its tables), AdamW without weight decay, α = 0.5 SmoothQuant-style LET init, 20 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import Method, register
from .reconstruct.driver import reconstruct_needs, run_reconstruct
from .reconstruct.recipe import ReconstructConfig


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
            raise ConfigError("OmniQuant training needs --lwc and/or --let (or --epochs 0 for initialisation only)")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if self.lwc_lr <= 0 or self.let_lr <= 0:
            raise ConfigError(f"learning rates must be positive, got lwc_lr={self.lwc_lr}, let_lr={self.let_lr}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {self.alpha}; the official default is 0.5")

    def to_reconstruct(self) -> ReconstructConfig:
        """The same method as a :class:`ReconstructConfig`: LWC (sigmoid logits) + LET, AdamW, constant
        learning rates, ``epochs`` passes over the calibration batches in order, one batch per step; the last
        parameters are kept (``keep_best``: the lowest full-calibration loss, evaluated every epoch)."""
        return ReconstructConfig(
            clip="sigmoid" if self.lwc else "none", let=self.let, rounding=False, start="rtn", epochs=self.epochs,
            steps=0, batch=1, sampling="ordered", optimizer="adamw", schedule="constant", lr=self.lwc_lr,
            clip_lr=self.lwc_lr, let_lr=self.let_lr, weight_decay=self.weight_decay, aug_loss=self.aug_loss,
            alpha=self.alpha, let_qk=self.let_qk, let_up_down=self.let_up_down,
            best="eval" if self.keep_best else "last")


register(Method("omniquant", lambda job, cfg: run_reconstruct(job, cfg.to_reconstruct()), options=OmniQuantConfig,
                default=lambda act: OmniQuantConfig(), needs=lambda cfg: reconstruct_needs(cfg.to_reconstruct()),
                learned=lambda cfg: cfg.to_reconstruct(), v1_key="omniquant",
                summary="OmniQuant (LWC + LET), the official code's defaults"))
