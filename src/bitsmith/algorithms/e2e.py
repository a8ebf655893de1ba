"""End-to-end tuning of the full-precision parameters left in a quantized model (norm weights and biases).

Block-wise reconstruction (:mod:`bitsmith.algorithms.reconstruct`) makes each block match its full-precision
output, one block at a time; the errors that remain compound through the stack, and block-output MSE does not
weigh them by what they do to the next-token distribution. After every block is quantized, this stage trains the
few parameters that stay in floating point -- the normalisation layers' weights (and LayerNorm biases), where
LET's scales were folded -- to minimise the KL divergence between the full-precision model's next-token
distribution and the quantized model's over the calibration tokens (knowledge distillation, as in the
end-to-end phases of EfficientQAT arXiv 2407.11062 and the norm tweaking of arXiv 2309.02784):

    L = 1/(B·T) Σ_{b,t} KL(p_fp(· | x_{b,≤t}) ‖ p_q(· | x_{b,≤t}))

The quantized weights (codes, scales) are untouched, so the result is still an ordinary quantized model whose
norms differ from the source checkpoint's. Adam with a linearly decaying learning rate; mini-batches from
reshuffled cycles over the calibration sequences; the parameters kept are those of the lowest KL measured (over
all calibration sequences at the start and the end, or over a held-out slice every few steps), so the initial
ones when training did not lower it. Under ``torch.distributed`` losses and gradients are averaged over ranks.

How the model is run for it is an :class:`Objective`: :class:`LogitsObjective` calls the whole model (autograd
through every block, full ``(b, T, V)`` logits); :mod:`bitsmith.end_to_end` runs it block by block with activation
checkpointing, the KL in chunks of tokens (:func:`chunked_kl`) and blocks streamed to the device when they do not
fit. The training loop here is the same for all.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import dist
from ..utils.device import autocast

log = logging.getLogger(__name__)

# ids (b, T) -> logits (b, T, V) of the model being tuned
StudentLogits = Callable[[torch.Tensor], torch.Tensor]
# indices of calibration sequences -> full-precision log-probabilities (b, T, V)
TeacherLogProbs = Callable[[list[int]], torch.Tensor]


@dataclass(frozen=True)
class EndToEndConfig:
    """``steps`` Adam steps of ``batch`` calibration sequences, learning rate ``lr`` decaying linearly to 0;
    ``seed`` drives the mini-batch order. ``holdout``: sequences taken from the end of the calibration set, never
    trained on, whose KL picks the kept parameters among the start and every ``eval_every`` steps (0: the KL
    over all calibration sequences at the start and the end decides)."""

    steps: int = 100
    lr: float = 1e-2
    batch: int = 8
    seed: int = 0
    holdout: int = 0
    eval_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "holdout", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"end-to-end {name} must be a non-negative integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"end-to-end learning rate must be positive, got {self.lr}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"end-to-end batch must be a positive integer, got {self.batch!r}")


def kl_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student): logits ``(b, T, V)``, teacher log-probabilities ``(b, T, V)``."""
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    t = teacher_logp.float()
    return (t.exp() * (t - logp)).sum(-1).mean()


def chunked_kl(z: torch.Tensor, teacher_z: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
               chunk: int, grad: bool = False) -> tuple[float, torch.Tensor | None]:
    """Mean per-token KL(teacher ‖ student) with student logits ``head(z)`` and teacher logits ``head(teacher_z)``
    (``z``, ``teacher_z``: ``(b, T, H')``; ``head``: ``(m, H') -> (m, V)``), ``chunk`` tokens at a time, so no
    ``(b·T, V)`` tensor ever exists: the same value as :func:`kl_loss` on the full logits (up to summation order).

    With ``grad``, each chunk's share of the loss is back-propagated at once to a detached copy of ``z``, whose
    gradient ``dL/dz`` ``(b, T, H')`` is returned (the caller continues the backward from ``z``); else None."""
    flat = z.detach().reshape(-1, z.shape[-1]).requires_grad_(grad)
    teacher_flat = teacher_z.reshape(-1, teacher_z.shape[-1])
    tokens = flat.shape[0]
    total = 0.0
    for start in range(0, tokens, chunk):
        with torch.no_grad():
            t = torch.log_softmax(head(teacher_flat[start:start + chunk]).float(), dim=-1)
        with torch.set_grad_enabled(grad):
            logp = torch.log_softmax(head(flat[start:start + chunk]).float(), dim=-1)
            kl = (t.exp() * (t - logp)).sum()
            if grad:
                (kl / tokens).backward()
        total += float(kl.detach())
    return total / max(tokens, 1), (flat.grad.view_as(z) if grad else None)


class Objective(Protocol):
    """How the model being tuned is run on calibration sequences (by index into this rank's share).

    ``forward(units)``: the mean KL over ``units``, remembering what :meth:`backward` needs;
    ``backward()``: accumulate the gradients of that loss into the tuned parameters;
    ``kl(units, batch)``: the mean KL over ``units`` without gradients, ``batch`` sequences at a time."""

    def forward(self, units: list[int]) -> float: ...

    def backward(self) -> None: ...

    def kl(self, units: list[int], batch: int) -> float: ...


class LogitsObjective:
    """The whole model called at once: ``student`` ids ``(b, T)`` -> logits ``(b, T, V)`` (autograd through every
    block), ``teacher`` unit indices -> full-precision log-probabilities ``(b, T, V)``, ``ids`` ``(n, T)``."""

    def __init__(self, student: StudentLogits, teacher: TeacherLogProbs, ids: torch.Tensor) -> None:
        self.student, self.teacher, self.ids = student, teacher, ids
        self._loss: torch.Tensor | None = None

    def forward(self, units: list[int]) -> float:
        with autocast(self.ids.device):
            logits = self.student(self.ids[units])
        self._loss = kl_loss(logits, self.teacher(units))
        return float(self._loss.detach())

    def backward(self) -> None:
        assert self._loss is not None, "forward first"
        self._loss.backward()
        self._loss = None

    def kl(self, units: list[int], batch: int) -> float:
        return calibration_kl(self.student, self.teacher, self.ids, units, batch)


@torch.no_grad()
def calibration_kl(student: StudentLogits, teacher: TeacherLogProbs, ids: torch.Tensor, units: list[int],
                   batch: int) -> float:
    """Mean KL over the calibration sequences ``units`` of ``ids`` ``(n, T)`` (averaged over ranks)."""
    total = 0.0
    for i in range(0, len(units), batch):
        idx = units[i:i + batch]
        with autocast(ids.device):
            logits = student(ids[idx])
        total += float(kl_loss(logits, teacher(idx))) * len(idx)
    return dist.mean_scalar(total / max(len(units), 1))


def tune_end_to_end(objective: Objective, params: list[nn.Parameter], n: int, cfg: EndToEndConfig) -> dict:
    """Train ``params`` in place to minimise the KL above on ``n`` calibration sequences run by ``objective``.

    Returns ``{"kl_before", "kl_after", "steps", "best_step", "judged_on"}``: the KL (over the held-out sequences,
    or all of them without a holdout) before training and of the kept parameters, which are those of the lowest
    such KL (the initial ones when training did not improve it). A non-finite loss stops training there.
    """
    if cfg.holdout >= n:
        raise ConfigError(f"end-to-end holdout ({cfg.holdout}) leaves no calibration sequences to train on ({n})")
    n_train = n - cfg.holdout
    judge = list(range(n_train, n)) if cfg.holdout else list(range(n))
    info = {"kl_before": math.nan, "kl_after": math.nan, "steps": 0, "best_step": 0,
            "judged_on": "holdout" if cfg.holdout else "calibration"}
    if not params or cfg.steps == 0 or n == 0:
        return info
    batch = min(cfg.batch, n_train)
    best, best_state = objective.kl(judge, batch), [p.detach().clone() for p in params]
    info["kl_before"] = best
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    for step in range(cfg.steps):
        if len(order) < batch:
            order = torch.randperm(n_train, generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(dist.mean_scalar(objective.forward(idx))):
            log.warning("end-to-end tuning: non-finite loss at step %d; keeping the best parameters so far", step)
            break
        objective.backward()
        dist.average_gradients(params)
        opt.step()
        sched.step()
        info["steps"] = step + 1
        if step + 1 == cfg.steps or (cfg.holdout and cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            value = objective.kl(judge, batch)
            if value < best:
                best, best_state, info["best_step"] = value, [p.detach().clone() for p in params], step + 1
    with torch.no_grad():
        for p, saved, flag in zip(params, best_state, flags):
            p.copy_(saved)
            p.requires_grad_(flag)
    info["kl_after"] = best
    log.info("end-to-end tuning: %s KL %.4g → %.4g (step %d of %d kept)", info["judged_on"], info["kl_before"],
             best, info["best_step"], info["steps"])
    return info
