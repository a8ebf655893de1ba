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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

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


def tune_end_to_end(student: StudentLogits, teacher: TeacherLogProbs, params: list[nn.Parameter],
                    ids: torch.Tensor, cfg: EndToEndConfig) -> dict:
    """Train ``params`` in place to minimise the KL above on calibration sequences ``ids`` ``(n, T)``.

    Returns ``{"kl_before", "kl_after", "steps", "best_step", "judged_on"}``: the KL (over the held-out sequences,
    or all of them without a holdout) before training and of the kept parameters, which are those of the lowest
    such KL (the initial ones when training did not improve it). A non-finite loss stops training there.
    """
    n = ids.shape[0]
    if cfg.holdout >= n:
        raise ConfigError(f"end-to-end holdout ({cfg.holdout}) leaves no calibration sequences to train on ({n})")
    n_train = n - cfg.holdout
    judge = list(range(n_train, n)) if cfg.holdout else list(range(n))
    info = {"kl_before": math.nan, "kl_after": math.nan, "steps": 0, "best_step": 0,
            "judged_on": "holdout" if cfg.holdout else "calibration"}
    if not params or cfg.steps == 0 or n == 0:
        return info
    batch = min(cfg.batch, n_train)
    evaluate = lambda: calibration_kl(student, teacher, ids, judge, batch)  # noqa: E731
    best, best_state = evaluate(), [p.detach().clone() for p in params]
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
        with autocast(ids.device):
            logits = student(ids[idx])
        loss = kl_loss(logits, teacher(idx))
        if not math.isfinite(dist.mean_scalar(float(loss.detach()))):
            log.warning("end-to-end tuning: non-finite loss at step %d; keeping the best parameters so far", step)
            break
        loss.backward()
        dist.average_gradients(params)
        opt.step()
        sched.step()
        info["steps"] = step + 1
        last = step + 1 == cfg.steps
        if last or (cfg.holdout and cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            value = evaluate()
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
