"""Activation statistics gathered by forward pre-hooks (replacing OmniQuant's separate pre-pass script)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


@dataclass
class ChannelStats:
    """Per-input-channel statistics of a module's input ``x (..., C)``: running absmax, min, max and an
    exponential moving average of the channel midpoint ``(max + min)/2`` (OS+ shift init, OmniQuant A7)."""

    absmax: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    mid_ema: torch.Tensor | None = None
    count: int = 0
    ema: float = 0.99

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = x.amin(0), x.amax(0)
        mid = (lo + hi) / 2
        if self.count == 0:
            self.min, self.max, self.absmax, self.mid_ema = lo, hi, x.abs().amax(0), mid
        else:
            self.min = torch.minimum(self.min, lo)
            self.max = torch.maximum(self.max, hi)
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
            self.mid_ema = self.ema * self.mid_ema + (1 - self.ema) * mid
        self.count += 1


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


@contextmanager
def collect_inputs(modules: dict[str, nn.Module], max_rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, keep up to ``max_rows`` rows ``(n, C)`` of each module's first input (in order)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    out: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod, args):
            have = sum(r.shape[0] for r in rows[name])
            if have < max_rows:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                rows[name].append(x[: max_rows - have].float())
        return fn

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
        out.update({name: torch.cat(r) for name, r in rows.items() if r})
