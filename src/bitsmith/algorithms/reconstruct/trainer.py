"""The one block-reconstruction trainer (OmniQuant arXiv 2308.13137 §3.1 Eq. 1, SignRound arXiv 2309.05516).

Minimises ``‖F(W, X) − F(Q(W; Θ), X_q)‖²`` per decoder block over pluggable learnable parameter groups
(:mod:`bitsmith.algorithms.reconstruct.learnable`: LWC clipping, LET scales/shifts, rounding offsets), each with its own
learning rate. The calibration set is a list of *units* (one captured batch each); one optimizer step averages
the loss over ``batch`` units (gradient accumulation), drawn in order (OmniQuant: ``batch`` 1, epochs over the
units) or from reshuffled cycles (SignRound's sampler). Optimisers: AdamW (OmniQuant) or signed gradient
descent (SignRound), constant or linearly decaying learning rate. Parameters can be restored to the best
iteration: by the step's own mini-batch loss (SignRound), or by the loss over all training units or a held-out
slice, evaluated every ``eval_every`` steps (which also drives early stopping with ``patience``).

Under ``torch.distributed`` every rank holds its own units; losses and gradients are averaged over ranks
(:mod:`bitsmith.utils.dist`), so one step sees the global batch and every rank takes the same decisions.
A non-finite loss raises :class:`NonFiniteLoss`; :func:`train_with_retry` restores the initial parameters and
retries once with learning rates ÷10 before giving up with an error that names the block.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ...errors import ConfigError, NumericsError
from ...utils import dist
from ...utils.device import autocast

log = logging.getLogger(__name__)

BlockForward = Callable[[torch.Tensor, dict], torch.Tensor]
OPTIMIZERS = ("adamw", "signsgd")
SCHEDULES = ("constant", "linear")
SAMPLING = ("ordered", "random")
BEST = ("last", "step", "eval")
LOSSES = ("mse", "token_mse")


class NonFiniteLoss(RuntimeError):
    """The reconstruction loss became NaN or infinite."""


class LearnableGroup(Protocol):
    """A set of learnable tensors trained together (see :mod:`bitsmith.algorithms.reconstruct.learnable`)."""

    name: str
    lr: float

    def parameters(self) -> list[nn.Parameter]: ...

    def project(self) -> None:
        """Put the parameters back into their domain after an optimizer step (e.g. clamp to [−0.5, 0.5])."""

    def fold(self) -> None:
        """Make the learned state permanent in the weights (called once, after training)."""


@dataclass
class ParamGroup:
    """A plain named set of tensors with a learning rate (no projection, nothing to fold); ``optimizer``: its own
    optimizer kind when it differs from the trainer's."""

    name: str
    params: list[nn.Parameter]
    lr: float
    optimizer: str | None = None

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def project(self) -> None:
        pass

    def fold(self) -> None:
        pass


@dataclass(frozen=True)
class TrainConfig:
    """How to train one block.

    ``steps``: optimizer steps; ``batch``: calibration units per step (under torchrun a unit is each rank's
    slice of one global calibration batch);
    ``sampling``: ``ordered`` (cycle through the units in order: ``steps = epochs × units / batch`` is
    OmniQuant's epoch loop) or ``random`` (reshuffled cycles, SignRound); ``optimizer`` ``adamw`` or
    ``signsgd``; ``schedule`` ``constant`` or ``linear`` (decays to 0 at the last step); ``best``:
    ``last`` (keep the final parameters, OmniQuant), ``step`` (parameters of the lowest mini-batch loss seen,
    SignRound) or ``eval`` (lowest loss over the training units, or over the ``holdout`` units when set,
    evaluated before training and every ``eval_every`` steps; ``patience`` evaluations without improvement
    stop early, 0 = never); ``holdout``: units taken from the end of the calibration set and never trained on.
    ``loss``: ``mse`` (OmniQuant, SignRound) or ``token_mse`` (each token's error divided by the RMS of its
    target: the error as the next pre-norm block's RMSNorm/LayerNorm sees it, so tokens with large hidden
    states do not dominate; see :func:`block_loss`).
    """

    steps: int = 20
    batch: int = 1
    sampling: str = "ordered"
    optimizer: str = "adamw"
    schedule: str = "constant"
    weight_decay: float = 0.0
    best: str = "last"
    eval_every: int = 0
    holdout: int = 0
    patience: int = 0
    seed: int = 0
    loss: str = "mse"

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "holdout", "patience", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"batch (calibration units per step) must be a positive integer, got {self.batch!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("sampling", SAMPLING),
                              ("best", BEST), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be ≥ 0, got {self.weight_decay}")
        if self.holdout and self.best != "eval":
            raise ConfigError("a held-out slice is judged by evaluation: set best='eval' with holdout > 0")


class _Sampler:
    """Unit indices for each step: in order, cycling (OmniQuant's epochs), or from reshuffled cycles
    (SignRound's ``IndexSampler``: a cycle's incomplete tail is dropped)."""

    def __init__(self, n: int, batch: int, random: bool, seed: int) -> None:
        self.n, self.batch, self.random = n, batch, random
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0

    def next(self) -> list[int]:
        if not self.random:
            out = [(self.pos + k) % self.n for k in range(self.batch)]
            self.pos += self.batch
            return out
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
        out = self.order[self.pos: self.pos + self.batch]
        self.pos += self.batch
        return out


class _SignSGD(torch.optim.Optimizer):
    """``p ← p − lr · sign(∇p)`` (SignRound's optimiser)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def block_loss(out: torch.Tensor, target: torch.Tensor, loss: str = "mse") -> torch.Tensor:
    """Reconstruction loss of a block output ``out`` against ``target`` (both ``(b, T, H)``).

    ``mse``: ``mean((out − target)²)`` (OmniQuant Eq. 1, SignRound). ``token_mse``:
    ``mean(((out − target) / rms(target))²)`` with ``rms`` over the hidden dimension of each token — the
    relative error each token carries into the next block, whose pre-norm divides it by (about) that RMS.
    """
    out, target = out.float(), target.float()
    if loss == "token_mse":
        rms = target.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=torch.finfo(target.dtype).tiny ** 0.5)
        return torch.nn.functional.mse_loss(out / rms, target / rms)
    return torch.nn.functional.mse_loss(out, target)


def _unit_loss(forward: BlockForward, h: torch.Tensor, kw: dict, targets: list[torch.Tensor],
               loss: str = "mse") -> torch.Tensor:
    with autocast(h.device):
        out = forward(h, kw)
    return sum(block_loss(out, t, loss) for t in targets)


def _same(a, b) -> bool:
    """Structural equality of keyword arguments (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


class _Batches:
    """Loss over several units: one forward on the units stacked along the batch axis when they are single
    sequences with identical keyword arguments (checked once against unit-by-unit outputs), else a mean of
    per-unit losses. Both are the mean of the per-unit MSEs (equal-sized units)."""

    def __init__(self, forward: BlockForward, q_inputs: list[torch.Tensor], targets: list[list[torch.Tensor]],
                 kwargs: list[dict], loss: str = "mse") -> None:
        self.forward, self.x, self.t, self.kw, self.kind = forward, q_inputs, targets, kwargs, loss
        self.stack = len(q_inputs) > 1 and all(h.shape == q_inputs[0].shape and h.shape[0] == 1 for h in q_inputs) \
            and all(_same(k, kwargs[0]) for k in kwargs[1:])
        if self.stack:
            with torch.no_grad():
                one = torch.cat([forward(h, kwargs[0]) for h in q_inputs[:2]])
                both = forward(torch.cat(q_inputs[:2]), kwargs[0])
            self.stack = both.shape == one.shape and bool(torch.allclose(both, one, rtol=1e-4, atol=1e-5))

    def loss(self, units: list[int]) -> torch.Tensor:
        if self.stack and len(units) > 1:
            h = torch.cat([self.x[u] for u in units])
            tg = [torch.cat([self.t[u][k] for u in units]) for k in range(len(self.t[units[0]]))]
            return _unit_loss(self.forward, h, self.kw[units[0]], tg, self.kind)
        return sum(_unit_loss(self.forward, self.x[u], self.kw[u], self.t[u], self.kind) for u in units) / len(units)


@torch.no_grad()
def eval_loss(forward: BlockForward, q_inputs: list[torch.Tensor], targets: list[list[torch.Tensor]],
              kwargs: list[dict], units: list[int] | None = None, batches: "_Batches | None" = None,
              chunk: int = 1, loss: str = "mse") -> float:
    """Mean reconstruction loss (``loss``, see :func:`block_loss`) over ``units`` (default: all), without
    gradients, averaged over ranks; ``chunk`` units per forward when ``batches`` can stack them (and then
    ``batches``' own loss applies)."""
    units = list(range(len(q_inputs))) if units is None else list(units)
    if not units:
        return math.nan
    if batches is None:
        vals = [float(_unit_loss(forward, q_inputs[u], kwargs[u], targets[u], loss)) for u in units]
        return dist.mean_scalar(sum(vals) / len(vals))
    total = sum(float(batches.loss(units[i:i + chunk])) * len(units[i:i + chunk])
                for i in range(0, len(units), chunk))
    return dist.mean_scalar(total / len(units))


class _Optimizers:
    """One optimizer per kind in use: a group's own ``optimizer`` attribute (when it has one) overrides
    ``cfg.optimizer``; each optimizer gets its own learning-rate schedule."""

    def __init__(self, groups: list[LearnableGroup], cfg: TrainConfig, lr_scale: float) -> None:
        kinds: dict[str, list[dict]] = {}
        for g in groups:
            kind = getattr(g, "optimizer", None) or cfg.optimizer
            kinds.setdefault(kind, []).append({"params": g.parameters(), "lr": g.lr * lr_scale})
        self.opts = [_SignSGD(spec, lr=spec[0]["lr"]) if kind == "signsgd"
                     else torch.optim.AdamW(spec, weight_decay=cfg.weight_decay) for kind, spec in kinds.items()]
        decay = (lambda t: max(0.0, 1.0 - t / cfg.steps)) if cfg.schedule == "linear" else (lambda t: 1.0)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in self.opts]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o, sch in zip(self.opts, self.scheds):
            o.step()
            sch.step()


def _local_batch(cfg: TrainConfig, n_train: int) -> int:
    """Units per step on this process. Under torchrun every rank holds as many units as one process would,
    each unit being this rank's slice of a global calibration batch, so the count is not divided."""
    return min(cfg.batch, n_train)


def train_block(forward: BlockForward, groups: list[LearnableGroup], q_inputs: list[torch.Tensor],
                targets: list[list[torch.Tensor]], kwargs: list[dict], cfg: TrainConfig,
                lr_scale: float = 1.0) -> dict:
    """Train ``groups`` in place (then :meth:`~LearnableGroup.project`-ed, not folded).

    ``q_inputs[u]``: ``(b, T, H)`` block inputs of unit ``u`` from the quantized prefix; ``targets[u]``: the
    tensors its output must match; ``kwargs[u]``: the block's keyword arguments. Returns ``{"step_losses",
    "eval_losses", "best_step", "steps_run"}``.
    """
    groups, n_train = [g for g in groups if g.parameters()], len(q_inputs) - cfg.holdout
    if n_train < 1:
        raise ConfigError(f"holdout ({cfg.holdout}) leaves no calibration units to train on "
                          f"({len(q_inputs)} units on this process)")
    info = {"step_losses": [], "eval_losses": [], "best_step": 0, "steps_run": 0}
    if not groups or cfg.steps == 0:
        return info
    params = [p for g in groups for p in g.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = _Optimizers(groups, cfg, lr_scale)
    sampler = _Sampler(n_train, _local_batch(cfg, n_train), cfg.sampling == "random", cfg.seed)
    eval_units = list(range(n_train, len(q_inputs))) if cfg.holdout else list(range(n_train))
    every = cfg.eval_every or max(1, math.ceil(n_train / sampler.batch))
    best_loss, best_state, stale = math.inf, None, 0

    def consider(value: float, step: int) -> bool:
        nonlocal best_loss, best_state, stale
        if value < best_loss:
            best_loss, best_state, stale, info["best_step"] = value, [p.detach().clone() for p in params], 0, step
            return True
        stale += 1
        return False

    batches = _Batches(forward, q_inputs, targets, kwargs, cfg.loss)
    evaluate = lambda: eval_loss(forward, q_inputs, targets, kwargs, eval_units, batches, sampler.batch)  # noqa: E731
    if cfg.best == "eval":
        info["eval_losses"].append(evaluate())
        consider(info["eval_losses"][-1], 0)
    for step in range(cfg.steps):
        value = _loss_and_grad(opt, batches, sampler, step)
        info["step_losses"].append(value)
        if cfg.best == "step":
            consider(value, step)  # the parameters that produced this loss (before the step)
        _apply_step(opt, params, groups)
        info["steps_run"] = step + 1
        if cfg.best == "eval" and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            info["eval_losses"].append(evaluate())
            consider(info["eval_losses"][-1], step + 1)
            if cfg.patience and stale >= cfg.patience:
                log.debug("early stop at step %d (best %d)", step + 1, info["best_step"])
                break
    if cfg.best == "last":
        info["best_step"] = info["steps_run"]
    elif best_state is not None:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    for p in params:
        p.requires_grad_(False)
    return info


def _loss_and_grad(opt: _Optimizers, batches: _Batches, sampler: _Sampler, step: int) -> float:
    """One mini-batch's loss, back-propagated; its value (the mean over ranks, so every rank decides alike)."""
    opt.zero_grad()
    loss = batches.loss(sampler.next())
    loss.backward()
    value = dist.mean_scalar(float(loss.detach()))
    if not math.isfinite(value):
        raise NonFiniteLoss(f"loss {value} at step {step}")
    return value


def _apply_step(opt: _Optimizers, params: list[torch.Tensor], groups: list[LearnableGroup]) -> None:
    """Gradients averaged over ranks, one optimizer step, each group projected back onto its domain."""
    dist.average_gradients(params)
    opt.step()
    for g in groups:
        g.project()


def train_with_retry(block_name: str, forward: BlockForward, groups: list[LearnableGroup], *args, **kwargs
                     ) -> dict:
    """:func:`train_block`, retried once from the initial parameters with learning rates ÷10 on a non-finite
    loss; a second failure raises ``ValueError`` naming the block (never a debugger prompt)."""
    snapshot = [[p.detach().clone() for p in g.parameters()] for g in groups]
    try:
        return train_block(forward, groups, *args, **kwargs)
    except NonFiniteLoss as first:
        log.warning("%s: %s; retrying with learning rates ÷10", block_name, first)
        with torch.no_grad():
            for g, saved in zip(groups, snapshot):
                for p, s in zip(g.parameters(), saved):
                    p.copy_(s)
        try:
            return train_block(forward, groups, *args, lr_scale=0.1, **kwargs)
        except NonFiniteLoss as second:
            raise NumericsError(
                f"{block_name}: training diverged twice ({second}); lower the learning rates (--lwc-lr/--let-lr/"
                "--lr), train fewer steps, or check the model for NaN/inf weights"
            ) from None
