"""Equivalence edges of one decoder block, built from its architecture row (OmniQuant LET, arXiv 2308.13137 §3.3).

Edges (in registration order, norm edges first so each linear's column transform precedes its row transforms):

* ``norm → linears`` for every ``norm_to_linears`` entry of the row (pre-norm models only); a shift is used
  only when the norm and all its consumers have biases (LayerNorm models: OPT, GPT-NeoX), so it can fold.
* ``q ↔ k``: q rows ÷ s, k rows × s with s of shape ``(kv_heads, head_dim − rotary_dim/2)``: one value per
  kv-head channel, shared by each RoPE pair ``(i, i + rotary_dim/2)`` (so it commutes with the rotation) and
  repeated over the query heads of a GQA group.
* ``v → o``: v rows ÷ s, o columns × s, one scale per kv-head channel repeated over the GQA group.
* ``up → down`` (optional; the official code leaves down_proj alone) where the row says a scale crosses.
"""

from __future__ import annotations

import torch
from torch import nn

from ..transforms import Edge, Site
from .registry import Architecture, Geometry, geometry


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


def let_edges(block: nn.Module, arch: Architecture, config, *, shift: bool = False, qk: bool = True,
              vo: bool = True, up_down: bool = False) -> list[Edge]:
    """Edges of ``block`` (its linears may already be QuantLinears). Nothing is registered yet."""
    geom = geometry(config, arch)
    get = block.get_submodule
    edges: list[Edge] = []
    if arch.flag("pre_norm", config):
        for norm_name, lin_names in arch.norm_to_linears:
            norm, consumers = get(norm_name), [get(n) for n in lin_names]
            use_shift = shift and getattr(norm, "bias", None) is not None and all(
                c.bias is not None for c in consumers)
            sites = [Site(norm, "rows_div")] + [Site(c, "cols_mul") for c in consumers]
            edges.append(Edge(norm_name, geom.hidden, sites, shift=use_shift))
    if qk and arch.q_to_k is not None:
        dim, qmap, kmap = _qk_maps(geom)
        q, k = (get(n) for n in arch.q_to_k)
        edges.append(Edge("qk", dim, [Site(q, "rows_div", _rows(arch, "q", geom), qmap),
                                      Site(k, "rows_mul", _rows(arch, "k", geom), kmap)]))
    if vo and arch.v_to_o is not None:
        v, o = (get(n) for n in arch.v_to_o)
        edges.append(Edge("vo", geom.kv_dim, [Site(v, "rows_div", _rows(arch, "v", geom)),
                                               Site(o, "cols_mul", None, _gqa_map(geom))]))
    if up_down and arch.up_to_down is not None and arch.up_down_equivalent:
        up, down = (get(n) for n in arch.up_to_down)
        edges.append(Edge("up_down", up.weight.shape[0], [Site(up, "rows_div"), Site(down, "cols_mul")]))
    return edges


def consumer_names(arch: Architecture, edge_name: str) -> str | None:
    """Name (relative to the block) of the linear whose input statistics initialise edge ``edge_name``."""
    for norm_name, lin_names in arch.norm_to_linears:
        if norm_name == edge_name:
            return lin_names[0]
    return {"vo": arch.v_to_o[1] if arch.v_to_o else None,
            "up_down": arch.up_to_down[1] if arch.up_to_down else None}.get(edge_name)
