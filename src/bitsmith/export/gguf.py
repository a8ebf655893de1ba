"""GGUF export (the llama.cpp file format) for LLaMA-family models, through the ``gguf`` package.

``bitsmith export OUT --format gguf --output MODEL.gguf`` reads a bitsmith output folder (its packed codes, or codes
recovered from its on-grid weights: :mod:`bitsmith.export.source`) and writes one ``.gguf``
file that llama.cpp loads (``llama-cli -m MODEL.gguf``, ``llama-perplexity``, llama-cpp-python).

**Block types.** GGUF's legacy block types hold 32 consecutive weights of a row with one fp16 scale ``d`` (and, for
the ``_1`` types, one fp16 offset ``m``). bitsmith's integer codes map onto them without re-quantization, code for
code (:func:`gguf_type_for`):

============================  ===========  =========================================================
bitsmith weights              GGUF type    block value
============================  ===========  =========================================================
symmetric INT2–4              ``Q4_0``     ``d·(n − 8)``,  ``n = q + 8``
symmetric INT5                ``Q5_0``     ``d·(n − 16)``, ``n = q + 16``
symmetric INT6–8              ``Q8_0``     ``d·n``,        ``n = q``
asymmetric INT2–4             ``Q4_1``     ``d·n + m``,    ``n = q``, ``m = −z·s``
asymmetric INT5               ``Q5_1``     ``d·n + m``,    ``n = q``, ``m = −z·s``
asymmetric INT6–7             ``Q8_0``     ``d·n``,        ``n = q − z`` (in [−127, 127])
============================  ===========  =========================================================

with ``d = fp16(s)``. Any granularity whose scale groups are whole 32-weight blocks works: groups of 32 or a
multiple of 32 (one ``d`` repeated over the group's blocks), per channel and per tensor, provided the row length
(``in_features``) is a multiple of 32.

**What "exact" means.** The codes are copied bit for bit; only the scale (and ``m``) are rounded to fp16, as every
GGUF block stores them. For ``Q4_0``/``Q5_0``/``Q8_0`` the stored weight is ``fp16(s)·c`` against bitsmith's
``s·c``: a relative error of at most 2^-11 per weight (the same as storing the dequantized weight in F16), and
**zero** when the scale already is an fp16 number (a model quantized in fp16, or bf16 scales). For ``Q4_1``/``Q5_1``
``m = fp16(−z·s)`` adds a second rounding: the error is at most ``(q + z)·|s|·2^-11`` per weight, i.e. at most
``2·(2^N − 1)·2^-11`` of one quantization step (1.5 % of a step for 4 bits). (For fp16-subnormal scales, below
6.1e-5, the absolute rounding error of ``d`` and ``m`` is at most 2^-25 instead.)

**What has no GGUF block type** (:func:`gguf_type_for` names the layer and the fix): asymmetric INT8 (``q − z`` spans
up to 511 values), FP weight formats (bitsmith's scaled FP8/FP6/FP4 grids are not GGUF's), LoRC factors, scale
groups that do not fill whole 32-weight blocks (e.g. ``--group-size 16``/``48``) and rows whose length is not a
multiple of 32 (the 172-wide ``down_proj`` of the fixtures). Such layers are **stored dense** (F32/F16/BF16, the
dtype of the bitsmith folder, i.e. its exact dequantized weight) with one warning naming them, so the file computes
the same function, only less compressed; ``strict=True`` (``--strict``) refuses them instead, before anything is
written. Activation / KV-cache quantization always raises (llama.cpp would not re-apply it), as does a non-LLaMA
architecture, RoPE scaling other than none/linear, or a folder in which no layer can be stored quantized. An
ordinary model folder (no ``bitsmith.json``) is written unquantized (F32/F16/BF16), e.g. as the input of llama.cpp's
own quantizer.

**K-quants.** Weights quantized with ``--wformat q4_k`` / ``q5_k`` / ``q6_k`` (:mod:`bitsmith.formats.kquant`: the
algorithms optimise llama.cpp's own super-block grid) are written as ``Q4_K`` / ``Q5_K`` / ``Q6_K``, codes copied
and the fp16 super-block scales and 6/8-bit sub-block scales recovered exactly (:mod:`.gguf_kquant`); rows not a
multiple of 256 were quantized to llama.cpp's fallback types (Q5_0, Q5_1, Q8_0) and are written as those.

**Layout.** Tensor names and metadata keys are llama.cpp's (``llama`` architecture, names through ``gguf``'s own
tensor map). Hugging Face checkpoints order each q/k head's rows for rotate-half RoPE (dim ``i`` pairs with
``i + d/2``); llama.cpp rotates consecutive pairs ``(2i, 2i+1)``, so q_proj/k_proj rows are permuted per head (per kv
head for k under GQA) as llama.cpp's ``convert_hf_to_gguf.py`` does (:func:`rope_permutation`). Quantized rows move
whole (codes, scale and zero are per row), so the permutation is exact. 1-D tensors (norms, biases) are F32;
other unquantized tensors keep the folder's dtype. A tied ``lm_head`` is not written (llama.cpp reuses
``token_embd``).

**Tokenizer.** A ``tokenizer.json`` holding a byte-fallback BPE (LLaMA-1/2 style, as the aidreams260K fixture) is
written as llama.cpp's ``llama`` (SentencePiece) vocabulary: tokens in id order, token types (control, unknown,
byte, user-defined, normal) and scores ``−rank`` of the BPE merge that produces each token, so llama.cpp's
highest-score-first merging follows the merge order (``convert_hf_to_gguf.py`` writes −1000 for every token);
special token ids and add-BOS/EOS come from ``gguf.SpecialVocab``. Without a tokenizer (stories260K), or with
another kind (byte-level BPE such as LLaMA-3's), the file gets llama.cpp's ``no_vocab`` tokenizer with
``vocab_size`` dummy tokens and a warning: it loads and runs on token ids, but cannot tokenize text.

Needs the optional dependency: ``pip install -e ".[export]"``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..formats import (
    FPFormat,
    IntFormat,
    KQuantFormat,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantizedTensor,
    QuantSpec,
    spec_from_dict,
)
from .gguf_kquant import encode_kquant

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[export]" (or pip install gguf)'
BLOCK = 32  # weights per block of every GGUF type used here
ARCHITECTURE = "LlamaForCausalLM"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _require_library():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError(f"the GGUF export needs the gguf package; {INSTALL_HINT}") from None


# ---- which block type ---------------------------------------------------------------------------------------
def _group_len(spec: QuantSpec, in_features: int) -> int:
    gran = spec.granularity
    return gran.group_size if isinstance(gran, PerGroup) else in_features


def gguf_type_for(name: str, spec: QuantSpec, in_features: int, has_lorc: bool):
    """The ``GGMLQuantizationType`` storing layer ``name``'s codes exactly (see the module table), or a one-line
    ValueError naming the layer, why GGUF cannot store it and the fix."""
    from gguf import GGMLQuantizationType as T

    fmt, gran = spec.format, spec.granularity
    if has_lorc:
        raise ExportError(f"layer {name} has LoRC factors, which no GGUF block type stores; "
                         "quantize without --lorc-rank to export it")
    if isinstance(fmt, KQuantFormat):
        if in_features % 256:  # the quantizer falls back for such rows, so a folder never holds this
            raise ExportError(f"layer {name} has {in_features} input features, not a multiple of 256: no {fmt.kind}")
        return getattr(T, fmt.kind.upper())
    if isinstance(fmt, FPFormat) or not isinstance(fmt, IntFormat):
        raise ExportError(f"layer {name} uses {fmt.name}, which has no GGUF block type (GGUF's Q-types are integer "
                         "grids); export INT2-8 weights, e.g. --wbits 4 --sym --group-size 32")
    if not isinstance(gran, (PerGroup, PerChannel, PerTensor)):
        raise ExportError(f"layer {name} uses {gran.kind} granularity; GGUF export needs group, channel or tensor")
    if in_features % BLOCK:
        raise ExportError(f"layer {name} has {in_features} input features, not a multiple of GGUF's block size "
                         f"{BLOCK}, so llama.cpp can store it only dense (F32/F16; drop --strict)")
    if _group_len(spec, in_features) % BLOCK:
        raise ExportError(f"layer {name} has groups of {gran.group_size} weights, which do not fill GGUF's "
                         f"{BLOCK}-weight blocks; re-quantize with --group-size 32 (or a multiple of 32, or per "
                         "channel)")
    if fmt.symmetric:
        return T.Q4_0 if fmt.bits <= 4 else T.Q5_0 if fmt.bits == 5 else T.Q8_0
    if fmt.bits <= 4:
        return T.Q4_1
    if fmt.bits == 5:
        return T.Q5_1
    if fmt.bits <= 7:
        return T.Q8_0
    raise ExportError(f"layer {name} uses asymmetric INT8, which has no GGUF block type (codes minus zero point "
                     "span up to 511 values, Q8_0 holds 256); re-quantize with --sym (stored as Q8_0) or "
                     "--wbits 7 or less")


# ---- block encoding -----------------------------------------------------------------------------------------
def _per_block(qt: QuantizedTensor, q: torch.Tensor) -> torch.Tensor:
    """Qparams ``(rows, G)`` → one value per 32-weight block, ``(out, in / 32)``."""
    full = qt.spec.granularity.expand(q.reshape(q.shape[0], -1, 1), qt.codes.shape)
    return full[:, ::BLOCK]


def _fp16_bytes(name: str, x: torch.Tensor, what: str) -> np.ndarray:
    """``(out, nb)`` float64 → fp16 as ``(out, nb, 2)`` bytes; ValueError when it overflows fp16."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ExportError(f"layer {name} has a block {what} beyond the fp16 range of GGUF blocks "
                         f"(max {float(x.abs().max()):.4g}), so llama.cpp can store it only dense (drop --strict)")
    return h.numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(n: np.ndarray) -> np.ndarray:
    """Block values ``(out, nb, 32)`` in [0, 32) → ``(out, nb, 16)`` bytes: element ``j`` in the low nibble of byte
    ``j``, element ``j + 16`` in its high nibble (ggml's ``qs`` layout)."""
    return ((n[..., :16] & 0x0F) | ((n[..., 16:] & 0x0F) << 4)).astype(np.uint8)


def _high_bits(n: np.ndarray) -> np.ndarray:
    """Fifth bits of ``(out, nb, 32)`` values → ``(out, nb, 4)`` bytes: a little-endian uint32 whose bit ``j`` is
    element ``j``'s (ggml's ``qh`` of Q5_0/Q5_1)."""
    bits = ((n >> 4) & 1).astype(np.uint32)
    words = (bits << np.arange(BLOCK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return words.astype("<u4").view(np.uint8).reshape(*n.shape[:-1], 4)


def encode_blocks(name: str, qt: QuantizedTensor, qtype) -> np.ndarray:
    """bitsmith's frozen codes ``(out, in)`` as GGUF blocks of ``qtype``: ``uint8 (out, in / 32 · type_size)``.

    ``qtype`` must be :func:`gguf_type_for`'s answer for ``qt.spec``; codes are copied, the block scale is
    ``fp16(s)`` and the ``_1`` types' offset ``fp16(−z·s)``."""
    from gguf import GGMLQuantizationType as T

    if isinstance(qt.spec.format, KQuantFormat):
        return encode_kquant(name, qt)
    out, n_in = qt.codes.shape
    codes = qt.codes.to(torch.int64)
    s = _per_block(qt, qt.scale.to(torch.float64))
    z = None if qt.zero is None else _per_block(qt, qt.zero.to(torch.float64))
    parts = [_fp16_bytes(name, s, "scale")]
    if qtype in (T.Q4_1, T.Q5_1):
        parts.append(_fp16_bytes(name, -z * s, "offset"))
    elif z is not None:  # asymmetric INT6-7 stored as Q8_0: codes minus zero point
        codes = codes - z.to(torch.int64).repeat_interleave(BLOCK, dim=1)
    n = codes.numpy().reshape(out, n_in // BLOCK, BLOCK)
    if qtype == T.Q8_0:
        parts.append(n.astype(np.int8).view(np.uint8))
    else:
        n = n + {T.Q4_0: 8, T.Q5_0: 16}.get(qtype, 0)
        if qtype in (T.Q5_0, T.Q5_1):
            parts.append(_high_bits(n))
        parts.append(_nibbles(n))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


# ---- Q/K row order ------------------------------------------------------------------------------------------
def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order taking a Hugging Face q/k projection (``rows = heads · head_dim``, rotate-half RoPE: dim ``i``
    pairs with ``i + head_dim/2``) to llama.cpp's (pairs ``(2i, 2i+1)``): ``gguf_rows = hf_rows[perm]``. Within each
    head, new row ``2i`` is old row ``i`` and new row ``2i+1`` is old row ``i + head_dim/2``. ``heads`` is the kv
    head count for k under GQA. LongTensor ``(rows,)``; its inverse is ``torch.argsort(perm)``."""
    if rows % (2 * heads):
        raise ExportError(f"{rows} rows do not split into {heads} heads of an even head dim; fix the config")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


# ---- metadata -----------------------------------------------------------------------------------------------
def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _add_hparams(writer, config: Any, geom: Any, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_quantized_by("bitsmith")
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(geom.hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(geom.heads)
    writer.add_head_count_kv(geom.kv_heads)
    writer.add_key_length(geom.head_dim)
    writer.add_value_length(geom.head_dim)
    writer.add_rope_dimension_count(geom.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _read_config(src: Path) -> dict[str, Any]:
    """``config.json`` of ``src``, checked to be a LLaMA-family model before the model is loaded."""
    path = src / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} cannot be read ({e}); pass a bitsmith output folder") from None
    archs = config.get("architectures") or []
    if not archs or archs[0] != ARCHITECTURE:
        raise ExportError(f"the GGUF export supports LLaMA-family models ({ARCHITECTURE}); {src} is "
                         f"{archs[0] if archs else 'of unknown architecture'}")
    return config


def _check_rope(src: Path, config: Any) -> None:
    kind = _rope_parameters(config).get("rope_type") or _rope_parameters(config).get("type") or "default"
    if kind not in ("default", "linear"):
        raise ExportError(f"{src} uses RoPE scaling {kind!r}, which the GGUF export does not write yet "
                         "(supported: none, linear)")


# ---- tokenizer ----------------------------------------------------------------------------------------------
def _merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """Score ``−rank`` of the first BPE merge producing each token."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _spm_vocab(tok: dict[str, Any], vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """tokens, scores, token types of a byte-fallback BPE ``tokenizer.json`` as llama.cpp's ``llama`` vocabulary,
    padded to ``vocab_size`` with unused ``[PADi]`` tokens."""
    from gguf import TokenType

    model = tok["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens") or []}
    for text, a in added.items():
        vocab.setdefault(text, int(a["id"]))
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
                         "fix the tokenizer or config of the model")
    by_id = {i: t for t, i in vocab.items()}
    scores = _merge_scores(model)
    floor = -float(len(scores) + 1)  # below every merge: tokens no merge produces
    tokens, values, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            values.append(floor)
            types.append(TokenType.UNUSED)
            continue
        a = added.get(text)
        if text == model.get("unk_token"):
            kind = TokenType.UNKNOWN
        elif a is not None:
            kind = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(text):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        tokens.append(text.encode("utf-8"))
        values.append(scores.get(text, 0.0 if len(text) == 1 else floor))
        types.append(kind)
    return tokens, values, types


def _add_vocab(writer, src: Path, vocab_size: int) -> str:
    """Write the tokenizer (see the module docstring); returns what was written."""
    import gguf

    path = src / "tokenizer.json"
    tok = None
    if path.is_file():
        try:
            tok = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{path} is corrupt ({e}); restore it or remove it to export without a tokenizer") \
                from None
    model = (tok or {}).get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens, scores, types = _spm_vocab(tok, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        quiet = logging.getLogger("gguf")  # its SpecialVocab warns about pair templates llama.cpp never uses
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            gguf.SpecialVocab(src, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        finally:
            quiet.setLevel(level)
        return "llama (byte-fallback BPE)"
    why = "has no tokenizer.json" if tok is None else \
        f"has a {model.get('type')} tokenizer without byte fallback, which this export does not convert"
    log.warning("GGUF export: %s %s; writing llama.cpp's no_vocab tokenizer (%d dummy tokens): the file runs on "
                "token ids only and cannot tokenize text", src, why, vocab_size)
    writer.add_tokenizer_model("no_vocab")
    return "no_vocab"


# ---- writing ------------------------------------------------------------------------------------------------
def check_output_file(dest: str | Path, overwrite: bool) -> Path:
    """Validate a ``.gguf`` output path before any work: refuse another suffix, a folder, or an existing file
    unless ``overwrite``."""
    dest = Path(dest)
    if dest.suffix != ".gguf":
        raise ExportError(f"the GGUF output {dest} must be a file path ending in .gguf, e.g. --output model.gguf")
    if dest.is_dir():
        raise ExportError(f"output path {dest} is a folder; pass a .gguf file path")
    if dest.exists() and not overwrite:
        raise ExportError(f"output file {dest} already exists; choose another --output or pass --overwrite")
    return dest


def _write_atomic(writer, dest: Path) -> None:
    """Write ``writer``'s file to a temporary sibling of ``dest`` and rename it into place; on any error the
    temporary file is removed, so ``dest`` is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 → an ordinary file's mode
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise


def _plan_layers(src: Path, layers: dict[str, Any], strict: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Block type per exportable layer, and the reason for each layer stored dense."""
    qtypes, dense = {}, {}
    for name, entry in layers.items():
        try:
            qtypes[name] = gguf_type_for(name, spec_from_dict(entry["spec"]), int(entry["shape"][1]),
                                         bool(entry.get("lorc")))
        except ValueError as e:
            if strict:
                raise
            dense[name] = str(e)
    if not qtypes:
        raise ExportError(f"no layer of {src} can be stored in a GGUF block type ({next(iter(dense.values()))})")
    return qtypes, dense


def _plan(src: Path, model, strict: bool):
    """``(source, block type per layer, reason per dense layer)``. An ordinary model folder (no ``bitsmith.json``)
    is written unquantized (every tensor F32/F16/BF16: the input of llama.cpp's own quantizer)."""
    from .hf import read_report
    from .source import open_source

    if read_report(src) is None:
        log.warning("%s is not a bitsmith output folder: writing every tensor unquantized", src)
        return None, {}, {}
    source = open_source(src, model)
    for key, what in (("act", "activation"), ("kv", "KV-cache")):
        if source.recipe.get(key):
            raise ExportError(f"{src} quantizes {what}s too; the GGUF export is weight-only (llama.cpp would not "
                             "re-apply it), re-quantize without --abits/--aformat/--kvbits to export it")
    if not source.layers:
        raise ExportError(f"{src} has no quantized layers; quantize weights (--wbits < 16) before exporting")
    qtypes, dense = _plan_layers(src, source.layers, strict)
    if dense:
        log.warning("GGUF export: %d of %d quantized layers stored dense (%s, their exact dequantized weights; "
                    "--strict to refuse instead): %s; layers: %s", len(dense), len(source.layers),
                    str(next(iter(model.parameters())).dtype).removeprefix("torch."),
                    next(iter(dense.values())), ", ".join(dense))
    return source, qtypes, dense


def _dense_array(t: torch.Tensor):
    """An unquantized tensor as written: 1-D → F32, else the folder's dtype (F32, F16 or BF16)."""
    import gguf

    if t.dim() == 1 or t.dtype == torch.float32:
        return t.float().numpy(), None
    if t.dtype == torch.float16:
        return t.numpy(), None
    return gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def export_gguf(src: str | Path, dest: str | Path, overwrite: bool = False, strict: bool = False) -> Path:
    """Write the bitsmith output folder ``src`` (a LLaMA-family model) as the llama.cpp file ``dest`` (``.gguf``);
    layers without a GGUF block type are stored dense with a warning (``strict``: ValueError instead)."""
    _require_library()
    import gguf

    from ..models import geometry, get_architecture, load_model

    src, dest = Path(src), check_output_file(dest, overwrite)
    config = _read_config(src)
    model, _ = load_model(src, dtype=config.get("dtype") or config.get("torch_dtype") or "float32")
    _check_rope(src, model.config)
    source, qtypes, dense = _plan(src, model, strict)

    arch = get_architecture(model)
    geom = geometry(model.config, arch)
    n_layers = int(model.config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    heads = {f"{arch.layers}.{i}.{arch.q_to_k[0]}": geom.heads for i in range(n_layers)}
    heads.update({f"{arch.layers}.{i}.{arch.q_to_k[1]}": geom.kv_heads for i in range(n_layers)})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, model.config, geom, src.name)
    used: Counter = Counter()
    for key, t in model.state_dict().items():
        module, _, kind = key.rpartition(".")
        if tied and module == arch.lm_head and module not in qtypes:
            continue
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ExportError(f"tensor {key} of {src} has no llama.cpp name; the GGUF export supports plain "
                             f"{ARCHITECTURE} checkpoints")
        perm = rope_permutation(t.shape[0], heads[module]) if module in heads else None
        if kind == "weight" and module in qtypes:
            qt = source.quantized(module)
            data, raw = encode_blocks(module, qt, qtypes[module]), qtypes[module]
            used[raw] += t.numel()
        else:
            data, raw = _dense_array(t.detach().cpu())
        if perm is not None:
            data = np.ascontiguousarray(data[perm.numpy()])
        writer.add_tensor(gname, data, raw_dtype=raw)
    mix = (source.recipe.get("gguf_mix") if source is not None else None) or ""
    if mix:
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{mix.upper()}"))
    elif used:
        main = used.most_common(1)[0][0].name
        writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main}", None)
                             or getattr(gguf.LlamaFileType, f"MOSTLY_{main}_M"))  # Q4_K/Q5_K: llama.cpp's _M names
    else:
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokenizer = _add_vocab(writer, src, int(model.config.vocab_size))
    _write_atomic(writer, dest)
    log.info("wrote GGUF file %s (%s; tokenizer %s; %d layers dense)", dest,
             ", ".join(f"{t.name}: {n} weights" for t, n in used.items()), tokenizer, len(dense))
    return dest
