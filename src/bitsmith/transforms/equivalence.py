"""Learnable Equivalent Transformation (OmniQuant, arXiv 2308.13137 Eq. 3): channel-wise scale ``s`` and shift
``δ`` moved between a producer and its consumers without changing the function (quantization off)::

    Y = X·Wᵀ + B = ((X − δ) ⊘ s)·(s ⊙ W)ᵀ + (B + δ·Wᵀ)

An :class:`Edge` names *sites*: tensors of modules and what the edge does to them.

============  =============================================================  =====================================
role          weight ``(out, in)`` / 1-D norm weight                          bias
============  =============================================================  =====================================
``rows_div``  ``W[rows] / s``  (producer: a norm, v_proj rows, q_proj rows)   ``(b[rows] − δ) / s``
``rows_mul``  ``W[rows] · s``  (k_proj rows in the Q/K transform)             ``b[rows] · s``
``cols_mul``  ``W[:, cols] · s`` (consumers reading the producer's output)    ``b + W[:, cols] · δ``
============  =============================================================  =====================================

``index`` picks the rows/columns a site touches (all when None) and ``map`` says which entry of the edge's
scale vector each of them uses (identity when None): this is how GQA (one v-row scale serves ``groups`` output-
projection columns) and RoPE (rotary pairs share one q/k scale) are expressed, as data. ``offset`` is for norms
that compute ``x̂ · (offset + w)`` (Gemma's ``(1 + w)``): a row site then transforms ``offset + w`` and stores
the result minus ``offset``, so ``(1 + w') = (1 + w) / s`` exactly.

Each site is registered as a :mod:`torch.nn.utils.parametrize` parametrization of the module's tensor. During
training the Hugging Face module's own forward reads the transformed tensor (differentiable in ``s`` and ``δ``);
:func:`fold_edges` removes the parametrizations leaving the transformed values in place — the same function
evaluated once, so folding is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats.ste import ste

ROLES = ("rows_div", "rows_mul", "cols_mul")
MIN_SCALE = 1e-2  # |s| below this is pushed out to ±1e-2 (straight-through), as in the official code


@dataclass
class Site:
    """One module tensor an edge transforms. ``index``/``map``: LongTensors (see module docstring)."""

    module: nn.Module
    role: str
    index: torch.Tensor | None = None
    map: torch.Tensor | None = None
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown site role {self.role!r}; use one of {ROLES}")


def _truncate(s: torch.Tensor) -> torch.Tensor:
    def fn(x: torch.Tensor) -> torch.Tensor:
        sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
        return torch.where(x.abs() < MIN_SCALE, sign * MIN_SCALE, x)
    return ste(s, fn)


class Edge(nn.Module):
    """A learnable scale (and optional shift) of length ``dim`` applied at ``sites``."""

    def __init__(self, name: str, dim: int, sites: list[Site], shift: bool = False,
                 consumer: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.consumer = consumer  # which module's input statistics initialise the edge (None: none)
        self.dim = dim
        self.sites = sites
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim)) if shift else None
        self._registered: list[tuple[nn.Module, str]] = []

    # the parametrizations hold a reference to the edge; keep the sites out of the module tree
    def effective_scale(self) -> torch.Tensor:
        return _truncate(self.scale)

    def register(self) -> None:
        """Attach the parametrizations (column sites before row sites on any one module)."""
        order = sorted(self.sites, key=lambda s: s.role != "cols_mul")
        for site in order:
            mod = site.module
            parametrize.register_parametrization(mod, "weight", _SiteFn(self, site, "weight"), unsafe=True)
            self._registered.append((mod, "weight"))
            if getattr(mod, "bias", None) is not None and (site.role != "cols_mul" or self.shift is not None):
                parametrize.register_parametrization(mod, "bias", _SiteFn(self, site, "bias"), unsafe=True)
                self._registered.append((mod, "bias"))

    def extra_repr(self) -> str:
        return f"{self.name}: dim={self.dim}, sites={len(self.sites)}, shift={self.shift is not None}"


@torch.no_grad()
def fold_edges(edges: list[Edge]) -> None:
    """Write every transformed tensor into its module and drop all parametrizations of ``edges``.

    All values are evaluated before any parametrization is removed: a bias transform ``b + W·δ`` reads the
    weight *before* its own transforms, which removing the weight's parametrization first would change.
    """
    targets = {(id(m), n): (m, n) for e in edges for m, n in e._registered}.values()
    values = [(m, n, getattr(m, n).detach().clone()) for m, n in targets if parametrize.is_parametrized(m, n)]
    for m, n, _ in values:
        parametrize.remove_parametrizations(m, n, leave_parametrized=False)
    for m, n, v in values:
        getattr(m, n).copy_(v)
    for e in edges:
        e._registered.clear()


def _raw_weight(mod: nn.Module) -> torch.Tensor:
    """A module's weight before any parametrization (what ``B + δ·Wᵀ`` needs)."""
    if parametrize.is_parametrized(mod, "weight"):
        return mod.parametrizations.weight.original
    return mod.weight


class _SiteFn(nn.Module):
    """Parametrization of one tensor of one site (see the module docstring's table)."""

    def __init__(self, edge: Edge, site: Site, tensor: str) -> None:
        super().__init__()
        object.__setattr__(self, "edge", edge)  # not a submodule: avoid cycles in the module tree
        object.__setattr__(self, "site", site)
        self.tensor = tensor

    def _vec(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = v.to(like.dtype)
        return v if self.site.map is None else v[self.site.map.to(v.device)]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        site, edge = self.site, self.edge
        s = self._vec(edge.effective_scale(), t)
        d = None if edge.shift is None else self._vec(edge.shift, t)
        idx = None if site.index is None else site.index.to(t.device)
        if site.role == "cols_mul":
            if self.tensor == "bias":
                w = _raw_weight(site.module)
                wc = w if idx is None else w[:, idx]
                return t + wc.to(t.dtype) @ d
            return t * s if idx is None else t.index_copy(1, idx, t[:, idx] * s)
        part = t if idx is None else t.index_select(0, idx)
        offset = site.offset if self.tensor == "weight" else 0.0
        if offset:
            part = part + offset
        if site.role == "rows_mul":
            new = part * (s if part.dim() == 1 else s[:, None])
        else:
            if self.tensor == "bias" and d is not None:
                part = part - d
            new = part / (s if part.dim() == 1 else s[:, None])
        if offset:
            new = new - offset
        return new if idx is None else t.index_copy(0, idx, new)


def smooth_scale(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al., arXiv 2211.10438 Eq. 4): ``s_j = max|X_j|^α / max|W_:,j|^(1−α)``, ≥ 1e-5."""
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.float().clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def _reduce_to_scale(v: torch.Tensor, site: Site, dim: int) -> torch.Tensor:
    """Per-column values of a consumer site → per scale entry (max over the columns that share an entry)."""
    if site.index is not None:
        v = v[site.index.to(v.device)]
    if site.map is None:
        return v
    out = torch.zeros(dim, dtype=v.dtype, device=v.device)
    return out.scatter_reduce(0, site.map.to(v.device), v, reduce="amax", include_self=False)


@torch.no_grad()
def init_edge(edge: Edge, act_absmax: torch.Tensor | None, alpha: float,
              act_mid: torch.Tensor | None = None) -> None:
    """Initialise ``edge`` SmoothQuant-style from its consumers' input absmax ``(C,)`` (OmniQuant §3.3 init);
    shifts from the channel midpoints ``act_mid`` (OS+). Edges without statistics (Q/K) start at 1."""
    consumers = [s for s in edge.sites if s.role == "cols_mul"]
    if act_absmax is None or not consumers:
        edge.scale.fill_(1.0)
        return
    w_absmax = torch.stack([
        _reduce_to_scale(_raw_weight(s.module).detach().abs().amax(dim=0).float(), s, edge.dim) for s in consumers
    ]).amax(dim=0)
    act = _reduce_to_scale(act_absmax.to(w_absmax.device).float(), consumers[0], edge.dim)
    edge.scale.copy_(smooth_scale(act, w_absmax, alpha))
    if edge.shift is not None and act_mid is not None:
        edge.shift.copy_(_reduce_to_scale(act_mid.to(w_absmax.device).float(), consumers[0], edge.dim))
