"""Activation statistics gathered by forward pre-hooks (replacing OmniQuant's separate pre-pass script)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..utils import dist


@dataclass
class ChannelStats:
    """Per-input-channel statistics of a module's input ``x (..., C)``: running absmax, min, max and an
    exponential moving average of the channel midpoint ``(max + min)/2`` over the calibration batches
    (OS+ shift init, OmniQuant A7).

    Under ``torch.distributed`` each rank sees its micro-batch of every global batch; it also keeps each
    update's ``(min, max)`` (``history``) so that :meth:`reduce` recovers the global batches' ranges (min/max
    over ranks) and recomputes the EMA over them exactly as one process would: the EMA of midpoints is not
    reducible, but per-batch extrema are.
    """

    absmax: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    mid_ema: torch.Tensor | None = None
    count: int = 0
    ema: float = 0.99
    history: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = x.amin(0), x.amax(0)
        self._step(lo, hi, x.abs().amax(0))
        if dist.world_size() > 1:
            if self.history is None:
                self.history = []
            self.history.append((lo, hi))

    def _step(self, lo: torch.Tensor, hi: torch.Tensor, absmax: torch.Tensor) -> None:
        mid = (lo + hi) / 2
        if self.count == 0:
            self.min, self.max, self.absmax, self.mid_ema = lo, hi, absmax, mid
        else:
            self.min = torch.minimum(self.min, lo)
            self.max = torch.maximum(self.max, hi)
            self.absmax = torch.maximum(self.absmax, absmax)
            self.mid_ema = self.ema * self.mid_ema + (1 - self.ema) * mid
        self.count += 1

    @torch.no_grad()
    def reduce(self) -> None:
        """Make the statistics global over ranks (every rank must call it, with the same number of updates;
        a no-op in one process). ``absmax`` of a batch is ``max(|min|, |max|)``, so it follows exactly."""
        if dist.world_size() == 1 or not self.history:
            return
        lo = dist.all_reduce_min_(torch.stack([a for a, _ in self.history]))
        hi = dist.all_reduce_max_(torch.stack([b for _, b in self.history]))
        self.count, self.history = 0, None
        for a, b in zip(lo, hi):
            self._step(a, b, torch.maximum(a.abs(), b.abs()))


@contextmanager
def collect_input_stats(modules: dict[str, nn.Module]) -> Iterator[dict[str, ChannelStats]]:
    """Within the context, every forward of ``modules[name]`` updates ``stats[name]`` from its first input."""
    stats = {name: ChannelStats() for name in modules}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: stats[n].update(args[0]))
             for name, m in modules.items()]
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()
    _reduce_all(stats)


def _reduce_all(stats: dict[str, ChannelStats]) -> None:
    """Global statistics over ranks; every rank must hold the same modules with the same update counts."""
    if dist.world_size() == 1:
        return
    counts = [float(st.count) for st in stats.values()]
    if dist.sum_scalars(counts) != [c * dist.world_size() for c in counts]:
        raise RuntimeError("activation statistics: ranks saw different numbers of calibration batches")
    for st in stats.values():
        st.reduce()


@contextmanager
def collect_inputs(modules: dict[str, nn.Module], max_rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, keep up to ``max_rows`` rows ``(n, C)`` of each module's first input (in order).
    A module that ran has an entry even when ``max_rows`` is 0 (``(0, C)``: a rank whose share falls outside
    the global budget still takes part in the collectives over that module's rows)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    out: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod, args):
            have = sum(r.shape[0] for r in rows[name])
            if have < max_rows or not rows[name]:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                rows[name].append(x[: max(max_rows - have, 0)].float())
        return fn

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
        out.update({name: torch.cat(r) for name, r in rows.items() if r})
