"""Mixture-of-experts blocks as ordinary linears: one ``nn.Linear`` per expert and projection.

Transformers 5 keeps a sparse MLP's experts as one module with 3-D parameters, ``gate_up_proj (E, 2I, H)`` (gate
rows first, then up) and ``down_proj (E, H, I)``, and dispatches tokens to them in its ``forward(hidden_states,
top_k_index, top_k_weights)``. :func:`split_experts` replaces that module by an :class:`ExpertList` holding
:class:`Expert` modules with ``gate_proj``/``up_proj``/``down_proj`` linears and the same ``forward`` (same
routing, same weighting, same accumulation order), so every bitsmith algorithm quantizes each expert's linears like
any other linear, and each expert's hooks and losses see exactly the tokens the router sends to it.
:func:`fused_experts` puts the original modules back (3-D parameters rebuilt from the per-expert weights) for
``save_pretrained``, which then writes the checkpoint's own per-expert layout.

Only the router (the ``MoE.router`` module, a ``weight (E, H)`` parameter) decides the routing; it is not an
``nn.Linear`` and stays in full precision.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

from .errors import ModelError
from .registry import Architecture, get_blocks, resolve

log = logging.getLogger(__name__)


class Expert(nn.Module):
    """One expert's SwiGLU-style MLP: ``down(act(gate(x)) * up(x))``; x ``(n, H)`` -> ``(n, H)``."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        object.__setattr__(self, "act_fn", act)  # shared activation module, not a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return lin


class ExpertList(nn.ModuleList):
    """The experts of one sparse block, indexed like the checkpoint (``experts.3.gate_proj``).

    ``forward(hidden_states (n, H), top_k_index (n, k), top_k_weights (n, k)) -> (n, H)``: each expert runs on the
    tokens routed to it and its output, times the routing weight, is added to those tokens' rows (as the fused
    module does). ``fused`` is the original module (weights dropped), kept to rebuild it for saving.
    """

    def __init__(self, experts: list[Expert], fused: nn.Module) -> None:
        super().__init__(experts)
        object.__setattr__(self, "fused", fused)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where((top_k_index == e).t())  # the fused module's order
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _split(fused: nn.Module) -> ExpertList:
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        raise ModelError(f"{type(fused).__name__} has no 3-D gate_up_proj/down_proj parameters; this transformers "
                         "version stores its experts differently from what bitsmith's MoE row expects")
    if getattr(fused, "has_bias", False) or getattr(fused, "is_transposed", False):
        raise ModelError(f"{type(fused).__name__} uses biased or transposed experts, which bitsmith does not split")
    inter = gate_up.shape[1] // 2
    experts = [Expert(gate_up[e, :inter], gate_up[e, inter:], down[e], fused.act_fn)
               for e in range(gate_up.shape[0])]
    fused.gate_up_proj, fused.down_proj = None, None  # the per-expert linears own the weights now
    return ExpertList(experts, fused)


def _experts_parent(block: nn.Module, arch: Architecture) -> tuple[nn.Module, str]:
    parent_path, _, child = arch.moe.experts.rpartition(".")
    return (resolve(block, parent_path) if parent_path else block), child


def split_experts(model: nn.Module, arch: Architecture) -> int:
    """Replace every block's fused experts module by an :class:`ExpertList` (idempotent). Returns how many."""
    if arch.moe is None:
        return 0
    count = 0
    for block in get_blocks(model, arch):
        parent, child = _experts_parent(block, arch)
        current = getattr(parent, child)
        if isinstance(current, ExpertList) or current is None:
            continue
        if any(p.is_meta for p in current.parameters()):
            continue  # a meta skeleton has no weights to split (streaming refuses MoE checkpoints up front)
        setattr(parent, child, _split(current))
        count += 1
    if count:
        log.debug("%s: split the experts of %d blocks into per-expert linears", arch.name, count)
    return count


def _fuse(experts: ExpertList) -> nn.Module:
    """The original experts module with 3-D parameters holding each expert's current (e.g. dequantized) weights."""
    fused = experts.fused

    def weight(module: nn.Module) -> torch.Tensor:  # a plain Linear, or a QuantLinear left by finalize_block
        return (module.effective_weight() if hasattr(module, "effective_weight") else module.weight).detach()

    gate_up = torch.stack([torch.cat([weight(x.gate_proj), weight(x.up_proj)]) for x in experts])
    down = torch.stack([weight(x.down_proj) for x in experts])
    fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    fused.down_proj = nn.Parameter(down, requires_grad=False)
    return fused


@contextlib.contextmanager
def fused_experts(model: nn.Module, arch: Architecture) -> Iterator[None]:
    """Within the context, every :class:`ExpertList` is the fused module transformers saves (weights copied)."""
    swapped: list[tuple[nn.Module, str, ExpertList]] = []
    if arch.moe is not None:
        for block in get_blocks(model, arch):
            parent, child = _experts_parent(block, arch)
            current = getattr(parent, child)
            if isinstance(current, ExpertList):
                setattr(parent, child, _fuse(current))
                swapped.append((parent, child, current))
    try:
        yield
    finally:
        for parent, child, experts in swapped:
            fused = getattr(parent, child)
            fused.gate_up_proj, fused.down_proj = None, None
            setattr(parent, child, experts)


def expert_index(name: str, arch: Architecture) -> int | None:
    """The expert index in a block-relative linear name (``mlp.experts.3.up_proj`` -> 3), None for other linears."""
    if arch.moe is None:
        return None
    prefix = f"{arch.moe.experts}."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].partition(".")[0]
    return int(head) if head.isdigit() else None
