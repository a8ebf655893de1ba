"""``bitsmith.load``: a bitsmith output folder as a runnable model of packed quantized linears."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from ..formats import spec_from_dict


def load(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """A bitsmith output folder as a model whose quantized linears are :class:`PackedLinear` modules (the stored
    packed codes, or codes recovered from the on-grid weights of a ``--no-pack`` folder); activation and KV-cache
    quantization from ``bitsmith.json`` are re-applied."""
    from ..models import get_architecture, load_model
    from ..models.kvcache import enable_kv_quant
    from ..nn.quantizer import ActQuantizer
    from .source import open_source, require_output

    require_output(path)
    model, _ = load_model(path)
    model.eval()
    source = open_source(path, model)
    for name in source.layers:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"packed layer {name} is not a module of the model in {path}; "
                             "the folder and its packed checkpoint do not belong together") from None
        bias = None if getattr(lin, "bias", None) is None else lin.bias.detach()
        packed = source.packed(name, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
    recipe = source.recipe
    if recipe.get("act"):
        spec = spec_from_dict(recipe["act"])
        for name in source.layers:
            m = model.get_submodule(name)
            m.act_quantizer = ActQuantizer(spec)
            m.register_forward_pre_hook(lambda mod, args: (mod.act_quantizer(args[0]), *args[1:]))
    if recipe.get("kv"):
        enable_kv_quant(model, get_architecture(model), spec_from_dict(recipe["kv"]))
    if device is not None:
        model.to(device)
    return model
