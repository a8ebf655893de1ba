"""compressed-tensors export (the checkpoint format vLLM and llm-compressor read), through the library's own API.

``bitsmith export OUT --format compressed-tensors --output DIR`` reads a bitsmith output folder made with
``--pack`` (the frozen codes and scales in ``quantized.safetensors`` are the source of truth), then:

1. builds one ``QuantizationScheme`` per distinct weight spec (``QuantizationArgs``: INT ``num_bits``,
   symmetric or not, ``channel``/``group``/``tensor`` strategy; or FP8 E4M3 as ``type="float"``), targeting the
   exact qualified names of the quantized linears, in one ``QuantizationConfig``;
2. ``apply_quantization_config`` registers ``weight_scale`` / ``weight_zero_point`` on those modules, which are
   filled with bitsmith's scales and zero points (asymmetric codes ``[0, 2^N)`` become the library's signed
   ``[−2^(N−1), 2^(N−1))`` by shifting the zero point by ``2^(N−1)``; ``(q − z)·s`` is unchanged);
3. ``ModelCompressor`` compresses the model (``pack-quantized`` for INT weights, ``float-quantized`` for FP8),
   the model is saved with ``save_pretrained`` and ``update_config`` adds the ``quantization_config`` to
   ``config.json``. A mixture of experts is saved with one linear per expert under the checkpoint's own names
   (``MoE.checkpoint``: Mixtral's ``block_sparse_moe.experts.E.w1``, Qwen3-MoE's ``mlp.experts.E.gate_proj``).

Layers compressed-tensors cannot represent (:func:`check_exportable`): ragged groups (``in % group_size != 0``,
e.g. a 172-wide ``down_proj`` with groups of 32), FP formats other than E4M3 (FP4/FP6 need the NVFP4/MXFP block
layouts, which bitsmith's scales do not follow) and layers with LoRC factors are **left dense**: the checkpoint
holds their exact dequantized weight (as the Hugging Face folder does), so the model computes the same function,
and one warning lists them with the reason. ``strict=True`` (``--strict``) turns that into a one-line
``ValueError`` naming the layer and the fix, before anything is written. M1/M2-constrained FP8 scales are ordinary
scales. Activation or KV-cache quantization always raises (the export is weight-only and would change the model's
outputs); so does a folder without any exportable layer.

Needs the optional dependency: ``pip install -e ".[export]"``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..formats import E4M3, FPFormat, IntFormat, PerChannel, PerGroup, PerTensor, QuantSpec, spec_from_dict
from ..models import get_architecture

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[export]" (or pip install compressed-tensors)'


def _require_library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ValueError(f"the compressed-tensors export needs the compressed-tensors package; {INSTALL_HINT}") \
            from None


def check_exportable(name: str, spec: QuantSpec, in_features: int, has_lorc: bool) -> None:
    """Raise a one-line ValueError when compressed-tensors cannot represent layer ``name``'s quantization."""
    fmt, gran = spec.format, spec.granularity
    if has_lorc:
        raise ValueError(f"layer {name} has LoRC factors, which compressed-tensors cannot store; "
                         "quantize without --lorc-rank to export it")
    if isinstance(fmt, FPFormat) and fmt != E4M3:
        raise ValueError(f"layer {name} uses {fmt.name}, which compressed-tensors stores only in the NVFP4/MXFP "
                         "block layouts that bitsmith's scales do not follow; export INT2-8 or FP8 (e4m3) weights")
    if not isinstance(fmt, (IntFormat, FPFormat)):
        raise ValueError(f"layer {name} uses format {fmt!r}, which has no compressed-tensors equivalent")
    if isinstance(gran, PerGroup) and in_features % gran.group_size:
        raise ValueError(f"layer {name} has {in_features} input features, not a multiple of group size "
                         f"{gran.group_size} (ragged last group), which compressed-tensors cannot store; "
                         f"re-quantize with a --group-size dividing {in_features}, or per channel")
    if not isinstance(gran, (PerChannel, PerGroup, PerTensor)):
        raise ValueError(f"layer {name} uses {gran.kind} granularity; export needs tensor, channel or group")


def quantization_args(spec: QuantSpec):
    """The compressed-tensors ``QuantizationArgs`` equivalent to a bitsmith weight spec."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    gran = spec.granularity
    kw: dict = {}
    if isinstance(gran, PerGroup):
        kw = {"strategy": QuantizationStrategy.GROUP, "group_size": gran.group_size}
    elif isinstance(gran, PerChannel):
        kw = {"strategy": QuantizationStrategy.CHANNEL}
    else:
        kw = {"strategy": QuantizationStrategy.TENSOR}
    fmt = spec.format
    if isinstance(fmt, IntFormat):
        return QuantizationArgs(num_bits=fmt.bits, type=QuantizationType.INT, symmetric=fmt.symmetric, **kw)
    return QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, symmetric=True, **kw)


def _qparam_shape(spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    """bitsmith's ``(rows, G)`` qparams in the library's layout: ``(out, G)`` group, ``(out, 1)`` channel,
    ``(1,)`` tensor."""
    if isinstance(spec.granularity, PerTensor):
        return scale.reshape(1)
    return scale.reshape(scale.shape[0], -1)


def export_compressed_tensors(src: str | Path, dest: str | Path, overwrite: bool = False,
                              strict: bool = False) -> Path:
    """Write the bitsmith ``--pack`` folder ``src`` as a compressed-tensors checkpoint in ``dest``; layers it
    cannot represent stay dense with a warning (``strict``: ValueError instead)."""
    _require_library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.apply import apply_quantization_config
    from safetensors.torch import load_file

    from ..models import load_model
    from .hf import atomic_folder, check_output_dir, read_report
    from .packed import PACKED_NAME, build_packed_linear, read_packed_config

    dest = check_output_dir(dest, overwrite)
    body = read_packed_config(src)
    recipe = (read_report(src) or {}).get("recipe", {})
    for key, what in (("act", "activation"), ("kv", "KV-cache")):
        if recipe.get(key):
            raise ValueError(f"{src} quantizes {what}s too; the compressed-tensors export is weight-only, "
                             "re-quantize without --abits/--aformat/--kvbits to export it")
    layers = body["layers"]
    if not layers:
        raise ValueError(f"{src} has no quantized layers; quantize weights (--wbits < 16) before exporting")
    groups: dict[str, tuple[QuantSpec, list[str]]] = {}
    dense: dict[str, str] = {}
    for name, entry in layers.items():
        spec = spec_from_dict(entry["spec"])
        try:
            check_exportable(name, spec, int(entry["shape"][1]), bool(entry.get("lorc")))
        except ValueError as e:
            if strict:
                raise
            dense[name] = str(e)
            continue
        groups.setdefault(repr(entry["spec"]), (spec, []))[1].append(name)
    if not groups:
        raise ValueError(f"no layer of {src} can be stored by compressed-tensors ({next(iter(dense.values()))})")
    if dense:
        log.warning("compressed-tensors export: %d of %d quantized layers left dense (exact dequantized weights; "
                    "--strict to refuse instead): %s; layers: %s", len(dense), len(layers),
                    next(iter(dense.values())), ", ".join(dense))

    model, tokenizer = load_model(src)
    tensors = load_file(str(Path(src) / PACKED_NAME))
    schemes = {f"group_{i}": QuantizationScheme(targets=names, weights=quantization_args(spec))
               for i, (spec, names) in enumerate(groups.values())}
    qconfig = QuantizationConfig(config_groups=schemes, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qconfig, show_progress=False)
    with torch.no_grad():
        for name, entry in layers.items():
            if name in dense:
                continue
            lin = model.get_submodule(name)
            packed = build_packed_linear(name, entry, tensors, None)
            qt = packed.unpack()
            lin.weight.copy_(qt.dequantize(lin.weight.dtype))  # the exact on-grid weight
            lin.weight_scale.data = _qparam_shape(qt.spec, qt.scale).to(lin.weight.dtype).clone()
            zp = getattr(lin, "weight_zero_point", None)
            if zp is not None:
                if qt.zero is not None:
                    z = _qparam_shape(qt.spec, qt.zero) - 2 ** (qt.spec.format.bits - 1)  # unsigned → signed grid
                else:
                    z = torch.zeros_like(lin.weight_scale)
                lin.weight_zero_point.data = z.to(zp.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=_checkpoint_state(model))
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("wrote compressed-tensors checkpoint (%s) to %s", qconfig.format, dest)
    return dest



def _checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with a mixture of experts' tensors under the checkpoint's own expert names
    (Mixtral's ``experts.E.w1/w3/w2``), which is what transformers' loader and vLLM look for; other rows' names
    are unchanged."""
    moe = get_architecture(model).moe
    state = model.state_dict()
    if moe is None or not moe.checkpoint:
        return state
    return {moe.saved_name(k) if ".experts." in k else k: v for k, v in state.items()}
