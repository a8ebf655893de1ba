"""compressed-tensors export (the checkpoint format vLLM and llm-compressor read), through the library's own API.

``bitsmith export OUT --format compressed-tensors --output DIR`` reads a bitsmith output folder (its packed codes,
or codes recovered from its on-grid weights: :mod:`bitsmith.export.source`), then:

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
scales. A folder without any exportable layer raises.

**Weight × activation.** When the recipe quantizes activations (dynamic, per token), every scheme also gets
``input_activations`` (8 bits, ``strategy="token"``, ``dynamic=True``; INT8 keeps bitsmith's asymmetric grid, FP8 is
E4M3), provided the pair is one vLLM has kernels for (:data:`DEPLOYABLE`, :func:`activation_scheme`): ``W8A8``
(INT8 × INT8, the only quantized scheme vLLM's CPU build runs), ``FP8_DYNAMIC``, ``W4AFP8`` (ZeroQuant-FP's
INT4 × FP8) and ``W4A8``. Other pairs (4/6-bit activations, FP4 weights, asymmetric weights) are refused with the
nearest deployable scheme; every layer must then be exportable (a dense layer would not quantize its input).
KV-cache quantization is refused: vLLM's FP8 KV cache uses static per-tensor scales, not bitsmith's per-token ones.

Needs the optional dependency: ``pip install -e ".[export]"``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ExportError
from ..formats import (
    E4M3,
    FPFormat,
    IntFormat,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    spec_from_dict,
)
from ..models import get_architecture

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[export]" (or pip install compressed-tensors)'


def _require_library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError(f"the compressed-tensors export needs the compressed-tensors package; {INSTALL_HINT}") \
            from None


def check_exportable(name: str, spec: QuantSpec, in_features: int, has_lorc: bool) -> None:
    """Raise a one-line ValueError when compressed-tensors cannot represent layer ``name``'s quantization."""
    fmt, gran = spec.format, spec.granularity
    if has_lorc:
        raise ExportError(f"layer {name} has LoRC factors, which compressed-tensors cannot store; "
                         "quantize without --lorc-rank to export it")
    if isinstance(fmt, FPFormat) and fmt != E4M3:
        raise ExportError(f"layer {name} uses {fmt.name}, which compressed-tensors stores only in the NVFP4/MXFP "
                         "block layouts that bitsmith's scales do not follow; export INT2-8 or FP8 (e4m3) weights")
    if not isinstance(fmt, (IntFormat, FPFormat)):
        raise ExportError(f"layer {name} uses format {fmt!r}, which has no compressed-tensors equivalent")
    if isinstance(gran, PerGroup) and in_features % gran.group_size:
        raise ExportError(f"layer {name} has {in_features} input features, not a multiple of group size "
                         f"{gran.group_size} (ragged last group), which compressed-tensors cannot store; "
                         f"re-quantize with a --group-size dividing {in_features}, or per channel")
    if not isinstance(gran, (PerChannel, PerGroup, PerTensor)):
        raise ExportError(f"layer {name} uses {gran.kind} granularity; export needs tensor, channel or group")


def quantization_args(spec: QuantSpec):
    """The compressed-tensors ``QuantizationArgs`` equivalent to a bitsmith weight spec."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationStrategy,
        QuantizationType,
    )

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


# Weight × activation schemes an engine runs (vLLM's compressed-tensors kernels), by bitsmith spec. Anything else
# with quantized activations is refused (:func:`activation_scheme`) with the nearest of these named.
DEPLOYABLE = (
    "W8A8 (INT8 weights per channel, symmetric; dynamic per-token INT8 activations; vLLM on CPU and GPU)",
    "FP8_DYNAMIC (FP8 E4M3 weights per channel or tensor; dynamic per-token FP8 activations; vLLM on GPU)",
    "W4AFP8 (INT4 weights, symmetric, groups of 128; dynamic per-token FP8 activations; vLLM on Hopper GPUs)",
    "W4A8 (INT4 weights, symmetric, groups of 128 or per channel; dynamic per-token INT8 activations)",
)


def activation_scheme(weight: QuantSpec, act: QuantSpec) -> str:
    """The compressed-tensors preset name that ``weight`` × per-token ``act`` is (``W8A8``, ``FP8_DYNAMIC``,
    ``W4AFP8``, ``W4A8``); a one-line ValueError naming the nearest deployable scheme otherwise."""
    wf, af, wg = weight.format, act.format, weight.granularity
    int8_act = isinstance(af, IntFormat) and af.bits == 8
    fp8_act = af == E4M3
    if not (int8_act or fp8_act):
        raise ExportError(f"activations in {af.name} have no engine kernel (vLLM runs 8-bit activations only: INT8 "
                         "or FP8 E4M3 per token); nearest deployable: W8A8 (--wbits 8 --sym --abits 8) or "
                         "FP8_DYNAMIC (--wformat fp8 --aformat fp8)")
    sym_int = isinstance(wf, IntFormat) and wf.symmetric
    if isinstance(wf, IntFormat) and not wf.symmetric:
        raise ExportError(f"weight-activation kernels need symmetric weights, these are asymmetric {wf.name}; "
                         "re-quantize with --sym")
    if sym_int and wf.bits == 8 and int8_act and isinstance(wg, PerChannel):
        return "W8A8"
    if wf == E4M3 and fp8_act and isinstance(wg, (PerChannel, PerTensor)):
        return "FP8_DYNAMIC"
    if sym_int and wf.bits == 4 and fp8_act and isinstance(wg, PerGroup) and wg.group_size == 128:
        return "W4AFP8"
    if sym_int and wf.bits == 4 and int8_act and (isinstance(wg, PerChannel)
                                                 or (isinstance(wg, PerGroup) and wg.group_size == 128)):
        return "W4A8"
    if isinstance(wf, FPFormat) and wf != E4M3:
        hint = ("FP4/FP6 weights with bitsmith's scales have no compressed-tensors kernel (NVFP4 needs groups of "
                "16 with FP8 scales, MXFP4 groups of 32 with power-of-two scales); nearest deployable: W4AFP8 "
                "(--wbits 4 --sym --group-size 128 --aformat fp8)")
    else:
        hint = "nearest deployable: " + "; ".join(DEPLOYABLE)
    raise ExportError(f"weights {wf.name} ({wg.kind}) × activations {af.name} is not a scheme an engine runs; {hint}")


def input_activation_args(act: QuantSpec):
    """``QuantizationArgs`` of bitsmith's dynamic per-token activation quantization (INT8, asymmetric as bitsmith
    computes it, or FP8 E4M3)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationStrategy,
        QuantizationType,
    )

    fmt = act.format
    kind = QuantizationType.FLOAT if isinstance(fmt, FPFormat) else QuantizationType.INT
    symmetric = isinstance(fmt, FPFormat) or bool(fmt.symmetric)
    return QuantizationArgs(num_bits=8, type=kind, symmetric=symmetric, strategy=QuantizationStrategy.TOKEN,
                            dynamic=True)


def _plan(source, strict: bool):
    """Spec groups ``{repr: (spec, names)}`` of the exportable layers and ``{name: reason}`` of the dense ones."""
    groups: dict[str, tuple[QuantSpec, list[str]]] = {}
    dense: dict[str, str] = {}
    for name, entry in source.layers.items():
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
        raise ExportError(f"no layer of {source.folder} can be stored by compressed-tensors "
                         f"({next(iter(dense.values()))})")
    if dense:
        log.warning("compressed-tensors export: %d of %d quantized layers left dense (exact dequantized weights; "
                    "--strict to refuse instead): %s; layers: %s", len(dense), len(source.layers),
                    next(iter(dense.values())), ", ".join(dense))
    return groups, dense


def _act_spec(src, recipe: dict) -> tuple[QuantSpec | None, str | None]:
    """The recipe's activation spec and its deployable scheme name (``(None, None)`` weight-only); KV-cache
    quantization and undeployable pairs are refused."""
    if recipe.get("kv"):
        raise ExportError(f"{src} quantizes the KV cache with bitsmith's dynamic per-token scales; vLLM's quantized "
                         "KV cache uses static per-tensor scales, which this export cannot derive: re-quantize "
                         "without --kvbits/--kvformat and serve with vLLM's --kv-cache-dtype fp8")
    if not recipe.get("act"):
        return None, None
    act = spec_from_dict(recipe["act"])
    if recipe.get("weight") is None:
        raise ExportError(f"{src} quantizes activations but not weights; no engine runs that, quantize weights too")
    return act, activation_scheme(spec_from_dict(recipe["weight"]), act)


def export_compressed_tensors(src: str | Path, dest: str | Path, overwrite: bool = False,
                              strict: bool = False) -> Path:
    """Write the bitsmith output folder ``src`` as a compressed-tensors checkpoint in ``dest``: weight-only
    (``W{N}A16``) or, when ``src`` quantizes activations, one of the weight-activation schemes vLLM serves
    (:data:`DEPLOYABLE`). Layers it cannot represent stay dense with a warning (``strict``: ValueError instead;
    with quantized activations always an error, since a dense layer would not quantize its input)."""
    _require_library()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.lifecycle.apply import (
        apply_quantization_config,
    )

    from ..models import load_model
    from .hf import atomic_folder, check_output_dir
    from .source import open_source, require_output

    dest = check_output_dir(dest, overwrite)
    act, scheme = _act_spec(src, require_output(src).get("recipe", {}))  # refusals before the model is loaded
    model, tokenizer = load_model(src)
    source = open_source(src, model)
    if not source.layers:
        raise ExportError(f"{src} has no quantized layers; quantize weights (--wbits < 16) before exporting")
    groups, dense = _plan(source, strict or act is not None)
    inputs = None if act is None else input_activation_args(act)
    schemes = {f"group_{i}": QuantizationScheme(targets=names, weights=quantization_args(spec),
                                                input_activations=inputs, format=_format(spec, act))
               for i, (spec, names) in enumerate(groups.values())}
    qconfig = QuantizationConfig(config_groups=schemes, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, qconfig, show_progress=False)
    with torch.no_grad():
        for name in source.layers:
            if name not in dense:
                _fill_qparams(model.get_submodule(name), source.quantized(name))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=_checkpoint_state(model))
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("wrote compressed-tensors checkpoint (%s%s) to %s", qconfig.format,
             "" if scheme is None else f", {scheme}", dest)
    return dest


def _format(weight: QuantSpec, act: QuantSpec | None) -> str | None:
    """The compression format when the library's inference would pick the wrong one: vLLM's W4A8 kernels (INT8
    or FP8 activations) read 4-bit weights packed (``weight_packed``), not one code per int8."""
    fmt = weight.format
    if act is not None and isinstance(fmt, IntFormat) and fmt.bits < 8:
        return "pack-quantized"
    return None


def _fill_qparams(lin, qt) -> None:
    """The exact on-grid weight, scale and (signed-grid) zero point of one linear."""
    lin.weight.copy_(qt.dequantize(lin.weight.dtype))
    lin.weight_scale.data = _qparam_shape(qt.spec, qt.scale).to(lin.weight.dtype).clone()
    zp = getattr(lin, "weight_zero_point", None)
    if zp is not None:
        if qt.zero is not None:
            z = _qparam_shape(qt.spec, qt.zero) - 2 ** (qt.spec.format.bits - 1)  # unsigned → signed grid
        else:
            z = torch.zeros_like(lin.weight_scale)
        lin.weight_zero_point.data = z.to(zp.dtype)


def _checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with a mixture of experts' tensors under the checkpoint's own expert names
    (Mixtral's ``experts.E.w1/w3/w2``), which is what transformers' loader and vLLM look for; other rows' names
    are unchanged."""
    moe = get_architecture(model).moe
    state = model.state_dict()
    if moe is None or not moe.checkpoint:
        return state
    return {moe.saved_name(k) if ".experts." in k else k: v for k, v in state.items()}
