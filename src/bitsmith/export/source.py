"""The one reader of a bitsmith output folder's quantized layers, shared by every export and :func:`bitsmith.load`.

A folder has, for each quantized linear, its codes, scales and zero points either **stored** (the packed checkpoint,
``packed/quantized.safetensors``, written by default) or only implied by its on-grid dense weights and the recipe
in ``bitsmith.json`` (``--no-pack``, or folders from before packing was the default). In the second case the codes
are **recovered** with :func:`bitsmith.formats.fit.fit_codes`, checked to reproduce the stored weights within
their dtype's rounding; a layer that does not (LoRC factors, weights edited afterwards, a grid finer than a 16-bit
dtype can resolve, e.g. 8-bit asymmetric codes stored in bf16) is refused with its name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..formats import QuantizedTensor, spec_from_dict
from ..nn.packed import PackedLinear
from .hf import read_report
from .packed import build_packed_linear, packed_files, parse_packed_config

log = logging.getLogger(__name__)


@dataclass
class Source:
    """Quantized layers of the folder ``folder`` whose model is ``model`` (loaded by the caller, any dtype).

    ``layers``: qualified name → ``{"spec": QuantSpec dict, "shape": [out, in], "lorc": … | None}``.
    ``recovered``: the codes come from the dense weights (no packed checkpoint in the folder)."""

    folder: Path
    model: nn.Module
    recipe: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    recovered: bool
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def packed(self, name: str, bias: torch.Tensor | None = None) -> PackedLinear:
        """Layer ``name`` as a :class:`PackedLinear` (stored buffers, or codes recovered from its weight)."""
        if not self.recovered:
            return build_packed_linear(name, self.layers[name], self._tensors, bias)
        weight = self.model.get_submodule(name).weight
        return PackedLinear(self.quantized(name), bias, weight.dtype)

    def quantized(self, name: str) -> QuantizedTensor:
        """Layer ``name``'s codes, ``(rows, G)`` scales and zero points."""
        if not self.recovered:
            return self.packed(name).unpack()
        from ..formats.fit import fit_codes

        weight = self.model.get_submodule(name).weight
        spec = spec_from_dict(self.layers[name]["spec"])
        try:
            return fit_codes(weight.detach().cpu(), spec)
        except ValueError as e:
            raise ExportError(f"layer {name} of {self.folder}: {e}; its codes cannot be recovered from the weights, "
                             "re-run bitsmith quantize (it writes the packed codes unless --no-pack)") from None


def _recover_layers(folder: Path, model: nn.Module, recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from ..models import block_linears, get_architecture

    if recipe.get("lorc_rank"):
        raise ExportError(f"{folder} has LoRC factors folded into its weights and no packed checkpoint, so its codes "
                         "cannot be recovered; re-run bitsmith quantize (it writes the packed codes unless --no-pack)")
    arch = get_architecture(model)
    return {name: {"spec": recipe["weight"], "shape": [lin.out_features, lin.in_features], "lorc": None}
            for name, lin in block_linears(model, arch)}


def require_output(folder: str | Path) -> dict[str, Any]:
    """The ``bitsmith.json`` of ``folder``; ValueError naming the fix for an ordinary model folder (call it before
    loading the model, so the error comes first)."""
    report = read_report(folder)
    if report is None:
        raise ExportError(f"{folder} is not a bitsmith output folder (no bitsmith.json); quantize it first with "
                         "bitsmith quantize")
    return report


def open_source(folder: str | Path, model: nn.Module) -> Source:
    """The quantized layers of the bitsmith output folder ``folder`` (``model``: its model, already loaded).
    ValueError for an ordinary model folder or one without quantized weights."""
    from safetensors.torch import load_file

    folder = Path(folder)
    recipe = require_output(folder).get("recipe", {})
    files = packed_files(folder)
    if files is not None:
        body = parse_packed_config(files[1])
        return Source(folder, model, recipe, body["layers"], False, load_file(str(files[0])))
    if not recipe.get("weight"):
        raise ExportError(f"{folder} has no quantized layers; quantize weights (--wbits < 16) before exporting")
    log.info("%s has no packed checkpoint: recovering each layer's codes from its on-grid weights", folder)
    return Source(folder, model, recipe, _recover_layers(folder, model, recipe), True)
