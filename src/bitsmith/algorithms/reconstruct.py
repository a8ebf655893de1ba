"""Block-wise reconstruction training (OmniQuant's loop, arXiv 2308.13137 §3.1 Eq. 1, generalised).

Minimises ``‖F(W, X) − F(Q(W; Θ), X_q)‖²`` per decoder block over pluggable learnable parameter groups
(LWC clipping logits, LET scales/shifts, …), each with its own learning rate. One AdamW step per calibration
batch, batches in order (no shuffling), like the official code; autocast on an accelerator, fp32 on the CPU.
A non-finite loss raises :class:`NonFiniteLoss`; :func:`train_with_retry` restores the initial parameters and
retries once with learning rates ÷10 before giving up with an error that names the block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..utils import dist
from ..utils.device import autocast

log = logging.getLogger(__name__)

BlockForward = Callable[[torch.Tensor, dict], torch.Tensor]


class NonFiniteLoss(RuntimeError):
    """The reconstruction loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    """``epochs`` passes over the calibration batches; AdamW with ``weight_decay``; ``aug_loss`` adds the
    official code's second target (full-precision block on the quantized inputs). ``keep_best`` evaluates the
    loss over all batches before training and after every epoch and restores the lowest-loss parameters at the
    end (the official code keeps the last ones, which with its constant learning rate are often not the best)."""

    epochs: int = 20
    weight_decay: float = 0.0
    aug_loss: bool = False
    keep_best: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be ≥ 0, got {self.weight_decay}")


@dataclass
class ParamGroup:
    """A named set of learnable tensors with its learning rate."""

    name: str
    params: list[nn.Parameter]
    lr: float


def _loss(forward: BlockForward, h: torch.Tensor, kw: dict, targets: list[torch.Tensor]) -> torch.Tensor:
    with autocast(h.device):
        out = forward(h, kw)
    return sum(torch.nn.functional.mse_loss(out.float(), t.float()) for t in targets)


def train_block(forward: BlockForward, groups: list[ParamGroup], q_inputs: list[torch.Tensor],
                targets: list[list[torch.Tensor]], kwargs: list[dict], cfg: TrainConfig,
                lr_scale: float = 1.0) -> list[float]:
    """Train ``groups`` in place; returns the mean loss of each epoch. ``q_inputs[b]``: ``(b, T, H)`` block
    inputs from the quantized prefix; ``targets[b]``: the tensors the output must match for batch ``b``."""
    groups = [g for g in groups if g.params]
    if not groups or cfg.epochs == 0:
        return []
    for g in groups:
        for p in g.params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": g.params, "lr": g.lr * lr_scale} for g in groups],
                            weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g.params]
    best = (eval_loss(forward, q_inputs, targets, kwargs), [p.detach().clone() for p in params]) \
        if cfg.keep_best else None
    history = []
    for epoch in range(cfg.epochs):
        total = 0.0
        for h, kw, tgt in zip(q_inputs, kwargs, targets):
            opt.zero_grad(set_to_none=True)
            loss = _loss(forward, h, kw, tgt)
            value = dist.mean_scalar(loss.detach())  # every rank sees the same value: same decisions
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss {value} in epoch {epoch}")
            loss.backward()
            dist.average_gradients(params)
            opt.step()
            total += value
        history.append(total / len(q_inputs))
        log.debug("epoch %d: loss %.6g", epoch, history[-1])
        if best is not None:
            current = eval_loss(forward, q_inputs, targets, kwargs)
            if current < best[0]:
                best = (current, [p.detach().clone() for p in params])
    if best is not None:
        with torch.no_grad():
            for p, saved in zip(params, best[1]):
                p.copy_(saved)
    for g in groups:
        for p in g.params:
            p.requires_grad_(False)
    return history


def train_with_retry(block_name: str, forward: BlockForward, groups: list[ParamGroup], *args, **kwargs
                     ) -> list[float]:
    """:func:`train_block`, retried once from the initial parameters with learning rates ÷10 on a non-finite
    loss; a second failure raises ``ValueError`` naming the block (never a debugger prompt)."""
    snapshot = [[p.detach().clone() for p in g.params] for g in groups]
    try:
        return train_block(forward, groups, *args, **kwargs)
    except NonFiniteLoss as first:
        log.warning("%s: %s; retrying with learning rates ÷10", block_name, first)
        with torch.no_grad():
            for g, saved in zip(groups, snapshot):
                for p, s in zip(g.params, saved):
                    p.copy_(s)
        try:
            return train_block(forward, groups, *args, lr_scale=0.1, **kwargs)
        except NonFiniteLoss as second:
            raise ValueError(
                f"{block_name}: training diverged twice ({second}); lower --lwc-lr/--let-lr, use fewer epochs, "
                "or check the model for NaN/inf weights"
            ) from None


@torch.no_grad()
def eval_loss(forward: BlockForward, q_inputs: list[torch.Tensor], targets: list[list[torch.Tensor]],
              kwargs: list[dict]) -> float:
    """Mean reconstruction loss without gradients (for before/after reports)."""
    vals = [float(_loss(forward, h, kw, t)) for h, kw, t in zip(q_inputs, kwargs, targets)]
    return dist.mean_scalar(sum(vals) / len(vals)) if vals else math.nan
