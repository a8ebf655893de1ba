"""Equivalence edges of one decoder block, built from its architecture row (OmniQuant LET, arXiv 2308.13137 §3.3).

Edges (in registration order, norm edges first so each linear's column transform precedes its row transforms):

* ``norm → linears`` for every ``norm_to_linears`` entry of the row (pre-norm models only); a shift is used
  only when the norm and all its consumers have biases (LayerNorm models: OPT, GPT-NeoX), so it can fold.
* ``q ↔ k``: q rows ÷ s, k rows × s with s of shape ``(kv_heads, head_dim − rotary_dim/2)``: one value per
  kv-head channel, shared by each RoPE pair ``(i, i + rotary_dim/2)`` (so it commutes with the rotation) and
  repeated over the query heads of a GQA group.
* ``v → o``: v rows ÷ s, o columns × s, one scale per kv-head channel repeated over the GQA group.
* ``up → down`` (optional; the official code leaves down_proj alone) where the row says a scale crosses; with a
  fused ``gate_up`` linear (Phi-3) only its up half; in a mixture of experts one edge per expert.

Row extensions (see :mod:`bitsmith.models.registry`): norm sites carry the row's ``norm_offset`` (Gemma's
``(1 + w)``); with ``qk_norm`` (Qwen3, Gemma 3) the Q/K edge acts on the per-head q/k norms' weights, shape
``(head_dim,)`` shared by all heads, so its scale has ``head_dim − rotary_dim/2`` entries (a scale on the q/k rows
would be undone by those norms). Expert names (``*``) expand to every expert of the block; the router, a consumer
of the post-attention norm, takes the norm edge's column compensation like any linear.
Every edge names the module whose input statistics initialise it (``Edge.consumer``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..transforms import Edge, Site
from .registry import Architecture, Geometry, expand, geometry


def _rows(arch: Architecture, part: str, geom: Geometry) -> torch.Tensor | None:
    return None if arch.fused_qkv is None else arch.fused_qkv.rows(part, geom)


def _qk_maps(geom: Geometry) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Scale length and the maps from q rows / k rows to scale entries."""
    half = geom.rotary_dim // 2
    n_free = geom.head_dim - half
    d = torch.arange(geom.head_dim)
    m = torch.where(d < half, d, d - half)  # rotary pair (i, i + half) → i; unrotated dims after them
    kmap = (torch.arange(geom.kv_heads)[:, None] * n_free + m[None, :]).reshape(-1)
    qmap = ((torch.arange(geom.heads)[:, None] // geom.groups) * n_free + m[None, :]).reshape(-1)
    return geom.kv_heads * n_free, qmap, kmap


def _gqa_map(geom: Geometry) -> torch.Tensor:
    """o_proj input column (query head h, dim d) → v row (kv head h // groups, dim d)."""
    h = torch.arange(geom.heads)[:, None] // geom.groups
    return (h * geom.head_dim + torch.arange(geom.head_dim)[None, :]).reshape(-1)


def _norm_edges(block: nn.Module, arch: Architecture, geom: Geometry, shift: bool) -> list[Edge]:
    edges = []
    for norm_name, patterns in arch.norm_to_linears:
        lin_names = [n for p in patterns for n in expand(block, p)]
        norm, consumers = block.get_submodule(norm_name), [block.get_submodule(n) for n in lin_names]
        use_shift = shift and getattr(norm, "bias", None) is not None and all(
            getattr(c, "bias", None) is not None for c in consumers)
        sites = [Site(norm, "rows_div", offset=arch.norm_offset)] + [Site(c, "cols_mul") for c in consumers]
        edges.append(Edge(norm_name, geom.hidden, sites, shift=use_shift, consumer=lin_names[0]))
    return edges


def _qk_edge(block: nn.Module, arch: Architecture, geom: Geometry) -> Edge:
    dim, qmap, kmap = _qk_maps(geom)
    if arch.qk_norm is not None:  # per-head norms after the projections: scale their (head_dim,) weights
        q_norm, k_norm = (block.get_submodule(n) for n in arch.qk_norm)
        head = qmap[: geom.head_dim]  # head 0's dims → scale entries (every head shares the norm weight)
        return Edge("qk", geom.head_dim - geom.rotary_dim // 2,
                    [Site(q_norm, "rows_div", None, head, arch.norm_offset),
                     Site(k_norm, "rows_mul", None, head, arch.norm_offset)])
    q, k = (block.get_submodule(n) for n in arch.q_to_k)
    return Edge("qk", dim, [Site(q, "rows_div", _rows(arch, "q", geom), qmap),
                            Site(k, "rows_mul", _rows(arch, "k", geom), kmap)])


def _up_down_edges(block: nn.Module, arch: Architecture) -> list[Edge]:
    ups, downs = (expand(block, p) for p in arch.up_to_down)
    edges = []
    for up_name, down_name in zip(ups, downs):
        up, down = block.get_submodule(up_name), block.get_submodule(down_name)
        rows = None
        if up_name == arch.gate_up:  # [gate | up] rows: only the up half multiplies down's input
            half = up.weight.shape[0] // 2
            rows = torch.arange(half, 2 * half)
        dim = up.weight.shape[0] if rows is None else rows.numel()
        name = "up_down" if len(ups) == 1 else f"up_down:{up_name.rpartition('.')[0]}"
        edges.append(Edge(name, dim, [Site(up, "rows_div", rows), Site(down, "cols_mul")], consumer=down_name))
    return edges


def let_edges(block: nn.Module, arch: Architecture, config, *, shift: bool = False, qk: bool = True,
              vo: bool = True, up_down: bool = False) -> list[Edge]:
    """Edges of ``block`` (its linears may already be QuantLinears). Nothing is registered yet."""
    geom = geometry(config, arch)
    edges: list[Edge] = []
    if arch.flag("pre_norm", config):
        edges.extend(_norm_edges(block, arch, geom, shift))
    if qk and arch.q_to_k is not None:
        edges.append(_qk_edge(block, arch, geom))
    if vo and arch.v_to_o is not None:
        v, o = (block.get_submodule(n) for n in arch.v_to_o)
        edges.append(Edge("vo", geom.kv_dim, [Site(v, "rows_div", _rows(arch, "v", geom)),
                                               Site(o, "cols_mul", None, _gqa_map(geom))], consumer=arch.v_to_o[1]))
    if up_down and arch.up_to_down is not None and arch.up_down_equivalent:
        edges.extend(_up_down_edges(block, arch))
    return edges
