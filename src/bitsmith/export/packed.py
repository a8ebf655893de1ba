"""Packed checkpoint: the real low-bit storage of every quantized linear, beside the Hugging Face folder.

``bitsmith quantize`` (unless ``--no-pack``) adds two files to the output folder, in its ``packed/`` subfolder
(:data:`PACKED_DIR`), where engines that read every ``*.safetensors`` file of a model folder (vLLM) or the
``model*.safetensors`` files (transformers) do not take them for model weights:

* ``packed/quantized.safetensors``: for each quantized linear ``<name>`` (qualified module name) the buffers of its
  :class:`~bitsmith.nn.PackedLinear` (the one packing code path): ``<name>.qweight`` (packed codes),
  ``<name>.scale``, ``<name>.zero`` (asymmetric integer formats only) and, with LoRC, ``<name>.lorc_a`` /
  ``<name>.lorc_b`` (fp16 factors) or ``<name>.lorc_a_packed`` / ``<name>.lorc_a_scale`` (… ``_b_…``; INT8
  factors). Biases stay in the Hugging Face weights.
* ``packed/quantization.json`` (``version`` 1): per layer its spec (``QuantSpec.to_dict()``), shape ``[out, in]``,
  logical ``storage_bits`` and ``bits_per_weight`` (scales counted at 16 bits), and the LoRC rank / factor specs.

:func:`bitsmith.export.load.load` builds the model from the folder (its dequantized weights), replaces the listed linears by
``PackedLinear`` modules holding the stored buffers, and re-applies activation and KV-cache quantization recorded
in ``bitsmith.json`` (as ``bitsmith eval`` does). Folders written before the ``packed/`` subfolder existed keep both
files at the top level; they are still read (:func:`packed_files`), with a warning that vLLM refuses such a folder.
A folder written with ``--no-pack`` has no packed files: :mod:`bitsmith.export.source` recovers the codes from its
on-grid weights instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..formats import QuantizedTensor, QuantSpec, spec_from_dict
from ..nn.packed import PackedLinear, unpack_codes

log = logging.getLogger(__name__)

PACKED_DIR = "packed"
PACKED_NAME = "quantized.safetensors"
PACKED_CONFIG = "quantization.json"
PACKED_VERSION = 1


def packed_files(folder: str | Path) -> tuple[Path, Path] | None:
    """``(weights, config)`` paths of the packed checkpoint in ``folder``: ``packed/`` first, else the top-level
    files of older folders (logged: vLLM reads every top-level ``*.safetensors`` and refuses them); None when
    the folder has none."""
    folder = Path(folder)
    for where in (folder / PACKED_DIR, folder):
        weights, config = where / PACKED_NAME, where / PACKED_CONFIG
        if weights.is_file() and config.is_file():
            if where == folder:
                log.warning("%s keeps its packed codes at the top level (an older bitsmith layout), which vLLM "
                            "reads as model weights and refuses; move %s and %s into %s/", folder, PACKED_NAME,
                            PACKED_CONFIG, PACKED_DIR)
            return weights, config
    return None


def packed_layers(model: nn.Module, frozen: dict[str, QuantizedTensor],
                  lorc: dict[str, Any] | None = None) -> dict[str, PackedLinear]:
    """One :class:`PackedLinear` per frozen layer (bias and dtype from the model's linear of that name)."""
    out = {}
    for name, qt in frozen.items():
        lin = model.get_submodule(name)
        weight = getattr(lin, "weight", None)
        dtype = weight.dtype if weight is not None else torch.float32
        qt = QuantizedTensor(qt.codes.cpu(), qt.scale.cpu(), None if qt.zero is None else qt.zero.cpu(), qt.spec)
        bias = None if getattr(lin, "bias", None) is None else lin.bias.detach().cpu()
        packed = PackedLinear(qt, bias, dtype)
        factors = (lorc or {}).get(name)
        if factors is not None:
            packed.set_lorc(factors.a, factors.b)
        out[name] = packed
    return out


def _layer_entry(p: PackedLinear) -> dict[str, Any]:
    bits = p.storage_bits()
    entry: dict[str, Any] = {
        "spec": p.spec.to_dict(), "shape": [p.out_features, p.in_features], "dtype": str(p.scale.dtype),
        "storage_bits": bits, "bits_per_weight": bits / (p.out_features * p.in_features), "lorc": None,
    }
    if hasattr(p, "lorc_specs"):
        entry["lorc"] = {"rank": p.lorc_rank,
                         "specs": {k: s.to_dict() for k, s in p.lorc_specs.items()}}
    return entry


def save_packed(model: nn.Module, frozen: dict[str, QuantizedTensor], lorc: dict[str, Any] | None,
                folder: str | Path) -> Path:
    """Write ``packed/quantized.safetensors`` and ``packed/quantization.json`` into the existing ``folder`` (each
    written to a temporary name and renamed, ``quantization.json`` last, so its presence means the packed files are
    complete)."""
    from safetensors.torch import save_file

    folder = Path(folder) / PACKED_DIR
    folder.mkdir(exist_ok=True)
    layers = packed_layers(model, frozen, lorc)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in layers.items():
        for key, buf in p.named_buffers():
            if key != "bias" and buf is not None:
                tensors[f"{name}.{key}"] = buf.contiguous()
    total = sum(p.storage_bits() for p in layers.values())
    n = sum(p.out_features * p.in_features for p in layers.values())
    body = {"version": PACKED_VERSION, "weights": PACKED_NAME,
            "layers": {name: _layer_entry(p) for name, p in layers.items()},
            "bits_per_weight": total / n if n else None}
    tmp = folder / f".{PACKED_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "bitsmith_packed_version": str(PACKED_VERSION)})
    os.replace(tmp, folder / PACKED_NAME)
    tmp = folder / f".{PACKED_CONFIG}.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, folder / PACKED_CONFIG)
    log.info("wrote packed weights of %d layers (%.3f bits per weight) to %s", len(layers),
             body["bits_per_weight"] or 0.0, folder / PACKED_NAME)
    return folder / PACKED_NAME


def read_packed_config(folder: str | Path) -> dict[str, Any]:
    """The ``quantization.json`` of a packed folder (ValueError naming the fix when absent or unreadable)."""
    files = packed_files(folder)
    if files is None:
        raise ExportError(f"{folder} has no packed checkpoint ({PACKED_DIR}/{PACKED_CONFIG} + {PACKED_NAME}); "
                         "re-run bitsmith quantize without --no-pack")
    return parse_packed_config(files[1])


def parse_packed_config(p: Path) -> dict[str, Any]:
    """The checked body of the ``quantization.json`` at ``p`` (ValueError naming the fix when unreadable)."""
    try:
        body = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{p} is corrupt ({e}); re-run bitsmith quantize") from None
    if body.get("version") != PACKED_VERSION:
        raise ExportError(f"{p} has version {body.get('version')!r}, this bitsmith reads version {PACKED_VERSION}; "
                         "re-run bitsmith quantize")
    return body


def _factor(tensors: dict[str, torch.Tensor], prefix: str, key: str, spec: dict | None, n: int):
    if spec is None:
        return tensors[f"{prefix}.{key}"]
    s = spec_from_dict(spec)
    codes = unpack_codes(tensors[f"{prefix}.{key}_packed"], s, n)
    return QuantizedTensor(codes, tensors[f"{prefix}.{key}_scale"], None, s)


def build_packed_linear(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor],
                        bias: torch.Tensor | None) -> PackedLinear:
    """Rebuild one :class:`PackedLinear` from its stored buffers (codes are unpacked and re-packed through the
    same code path; the result must equal the stored words)."""
    spec: QuantSpec = spec_from_dict(entry["spec"])
    out_f, in_f = entry["shape"]
    qweight, scale = tensors[f"{name}.qweight"], tensors[f"{name}.scale"]
    zero = tensors.get(f"{name}.zero")
    codes = unpack_codes(qweight, spec, in_f)
    if tuple(codes.shape) != (out_f, in_f):
        raise ExportError(f"packed layer {name} has codes of shape {tuple(codes.shape)}, expected {(out_f, in_f)}; "
                         "the packed checkpoint is corrupt, re-run bitsmith quantize")
    qt = QuantizedTensor(codes, scale, None if zero is None else zero.to(scale.dtype), spec)
    p = PackedLinear(qt, bias, scale.dtype)
    if not torch.equal(p.qweight, qweight):
        raise ExportError(f"packed layer {name} does not round-trip; the packed checkpoint is corrupt")
    lorc = entry.get("lorc")
    if lorc:
        specs = lorc.get("specs", {})
        a = _factor(tensors, name, "lorc_a", specs.get("lorc_a"), int(lorc["rank"]))
        b = _factor(tensors, name, "lorc_b", specs.get("lorc_b"), in_f)
        p.set_lorc(a, b)
    return p
