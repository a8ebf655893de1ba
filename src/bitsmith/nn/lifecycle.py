"""The only functions that swap modules: float → QuantLinear (fake) → frozen → plain Linear (folded)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from ..formats import QuantSpec
from .linear import QuantLinear
from .packed import PackedLinear
from .quantizer import ActQuantizer

SpecFn = Callable[[str, nn.Linear], "tuple[QuantSpec | None, QuantSpec | None]"]


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quant_linears(root: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """All QuantLinear modules under ``root`` with their qualified names."""
    for name, mod in root.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


def to_fake(root: nn.Module, names: list[str], spec_fn: SpecFn, lwc: bool = False) -> dict[str, QuantLinear]:
    """Replace the ``nn.Linear`` children ``names`` of ``root`` by QuantLinears in the ``fake`` state.

    ``spec_fn(name, linear)`` returns ``(weight_spec, act_spec)``; either may be None (not quantized).
    """
    out: dict[str, QuantLinear] = {}
    for name in names:
        lin = root.get_submodule(name)
        if isinstance(lin, QuantLinear):
            out[name] = lin
            continue
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is a {type(lin).__name__}, expected nn.Linear")
        wspec, aspec = spec_fn(name, lin)
        if wspec is not None:
            wspec.validate_for(lin.in_features, name)
        q = QuantLinear(lin, wspec, aspec, lwc=lwc)
        _set_child(root, name, q)
        out[name] = q
    return out


def set_quant_state(root: nn.Module, weight: bool, act: bool) -> None:
    """Turn weight fake-quantization (``fake`` vs ``float``) and activation (incl. KV) quantization on or off.

    Frozen layers stay frozen when ``weight`` is True and compute with the float weight when False.
    """
    for _, q in quant_linears(root):
        if q.weight_quantizer is not None:
            if not weight:
                q.state = "float"
            elif q.frozen is not None:
                q.state = "frozen"
            else:
                q.state = "fake"
    for m in root.modules():  # input quantizers of QuantLinears and free-standing ones (e.g. KV cache)
        if isinstance(m, ActQuantizer):
            m.enabled = act


@torch.no_grad()
def freeze_all(root: nn.Module) -> None:
    """Freeze every not-yet-frozen QuantLinear under ``root`` from its current fake quantization."""
    for _, q in quant_linears(root):
        if q.weight_quantizer is not None and q.frozen is None:
            q.freeze()


@torch.no_grad()
def fold_to_linear(root: nn.Module) -> int:
    """Replace every QuantLinear under ``root`` by a plain ``nn.Linear`` holding its dequantized weight.

    Activation quantizers are dropped (a Hugging Face model has no place for them; the recipe records them).
    Returns how many layers were folded.
    """
    names = [n for n, _ in quant_linears(root)]
    for name in names:
        q = root.get_submodule(name)
        _set_child(root, name, q.to_linear())
    return len(names)


@torch.no_grad()
def pack_all(root: nn.Module) -> int:
    """Replace every frozen QuantLinear under ``root`` by a :class:`PackedLinear`. Returns how many."""
    names = [n for n, q in quant_linears(root) if q.frozen is not None]
    for name in names:
        _set_child(root, name, PackedLinear.from_frozen(root.get_submodule(name)))
    return len(names)
