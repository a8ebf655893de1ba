"""llama.cpp's K-quant grids (``Q4_K``, ``Q5_K``, ``Q6_K``) as bitsmith weight formats.

A K-quant row is cut into super-blocks of 256 weights, each into sub-blocks (``sub`` = 32 for Q4_K/Q5_K, 16 for
Q6_K; the spec's granularity is ``PerGroup(sub)``). Every sub-block ``j`` has its own scale and, for Q4_K/Q5_K,
its own minimum, and those are themselves quantized under one fp16 scale per super-block (ggml-quants.c):

==========  =========  ====================================================================================
type        codes      weight of code ``q`` in sub-block ``j`` of a super-block
==========  =========  ====================================================================================
``Q4_K``    4 bit      ``d·sc_j·q − dmin·m_j``,  ``sc_j, m_j`` in ``[0, 63]`` (6 bit), ``d, dmin`` fp16
``Q5_K``    5 bit      the same with ``q`` in ``[0, 31]``
``Q6_K``    6 bit      ``d·sc_j·(q − 32)``,  ``sc_j`` in ``[−128, 127]`` (int8), ``d`` fp16
==========  =========  ====================================================================================

In bitsmith's terms each sub-block is an asymmetric integer block with scale ``s_j = d·sc_j`` and a real-valued
zero point ``z_j = dmin·m_j / s_j`` (Q6_K: ``z_j = 32``): :meth:`KQuantFormat.qparams` computes the sub-block
range (so LWC's clipping strengths act on it), then rounds the sub-block scales and minima onto the 6/8-bit grid
under the super-block's fp16 ``d``/``dmin`` with straight-through rounding, so every algorithm (RTN, GPTQ, AWQ,
the learned recipes) optimises the grid that the GGUF file stores, and the export only copies codes
(:func:`bitsmith.export.gguf`). ``d = fp16(max_j s_j / 63)`` (Q6_K: ``/ 127``), so the largest sub-block always
has ``sc = 63`` and ``d``/``sc`` are recovered exactly from ``s`` (:func:`super_block_params`).

Rows whose length is not a multiple of 256 have no K-quant layout; llama.cpp's quantizer then falls back to
``Q5_0`` (for Q4_K), ``Q5_1`` (Q5_K) or ``Q8_0`` (Q6_K): :func:`fallback_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import NumberFormat
from .granularity import PerGroup
from .integer import IntFormat
from .spec import QuantSpec
from .ste import round_ste

SUPER = 256
_KINDS = {  # name: (bits, sub-block, has_min)
    "q4_k": (4, 32, True),
    "q5_k": (5, 32, True),
    "q6_k": (6, 16, False),
}
K_FORMATS = tuple(_KINDS)


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


@dataclass(frozen=True, repr=False)
class KQuantFormat(NumberFormat):
    """One of llama.cpp's K-quant grids: ``q4_k``, ``q5_k`` or ``q6_k`` (see the module docstring)."""

    kind: str = "q4_k"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"unknown K-quant type {self.kind!r}; use one of {', '.join(K_FORMATS)}")

    @property
    def bits(self) -> int:  # type: ignore[override]
        return _KINDS[self.kind][0]

    @property
    def sub_block(self) -> int:
        """Weights per sub-block (the spec's group size)."""
        return _KINDS[self.kind][1]

    @property
    def has_min(self) -> bool:
        return _KINDS[self.kind][2]

    @property
    def name(self) -> str:
        return self.kind

    @property
    def is_float(self) -> bool:
        return False

    @property
    def has_zero_point(self) -> bool:
        return True

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def scale_levels(self) -> int:
        """Largest sub-block scale code: 63 (6-bit) or 127 (int8)."""
        return 63 if self.has_min else 127

    def _super(self, v: torch.Tensor) -> torch.Tensor:
        rows, groups, _ = v.shape
        per = SUPER // self.sub_block
        if groups % per:
            raise ConfigError(f"{self.kind} needs rows of a multiple of {SUPER} weights, got {groups * self.sub_block}"
                             f"; use fallback_spec for such rows")
        return v.reshape(rows, groups // per, per)

    def _quantize_scales(self, s: torch.Tensor, levels: int, lowest: int) -> torch.Tensor:
        """``s (rows, G, 1) ≥ 0`` → ``d·sc`` with ``d = fp16(max s / levels)`` per super-block and integer
        ``sc`` in ``[lowest, levels]`` (scales ≥ 1 code, so no sub-block scale is zero; minima may be 0)."""
        sup = self._super(s)
        d = _fp16_ste(sup.amax(-1, keepdim=True) / levels)
        d = torch.where(d > 0, d, torch.ones_like(d))
        sc = torch.clamp(round_ste(sup / d), lowest, levels)
        return (d * sc).reshape(s.shape)

    def qparams(self, xmin, xmax):
        if not self.has_min:  # Q6_K: symmetric codes q − 32 in [−32, 31]
            s = self._quantize_scales(torch.maximum(xmin.abs(), xmax.abs()) / 31, self.scale_levels, 1)
            return s, torch.full_like(s, 32.0)
        xmin = torch.clamp(xmin, max=0.0)
        xmax = torch.clamp(xmax, min=0.0)
        s = self._quantize_scales((xmax - xmin) / self.qmax, self.scale_levels, 1)
        off = self._quantize_scales(-xmin, self.scale_levels, 0)
        return s, off / s

    def quantize(self, x, scale, zero):
        q = torch.round(x / scale + zero)
        return q.clamp(0, self.qmax).to(torch.uint8)

    def dequantize(self, codes, scale, zero):
        return (codes.to(scale.dtype) - zero) * scale

    def fake_quant(self, x, scale, zero):
        q = torch.clamp(round_ste(x / scale + zero), 0, self.qmax)
        return (q - zero) * scale

    def to_dict(self) -> dict:
        return {"type": "kquant", "kind": self.kind}


def super_block_params(fmt: KQuantFormat, scale: torch.Tensor, zero: torch.Tensor):
    """``(d, sc, dmin, m)`` of ``(rows, G)`` sub-block qparams made by :meth:`KQuantFormat.qparams`: ``d``/``dmin``
    ``(rows, S)`` fp16-exact, ``sc``/``m`` ``(rows, G)`` integer codes (``dmin``/``m`` None for Q6_K). ValueError when
    the qparams are not on the K-quant scale grid."""
    rows, groups = scale.shape
    per = SUPER // fmt.sub_block

    def split(v: torch.Tensor, levels: int):
        sup = v.float().reshape(rows, groups // per, per)
        d = (sup.amax(-1, keepdim=True) / levels).to(torch.float16).float()
        d = torch.where(d > 0, d, torch.ones_like(d))
        code = torch.round(sup / d)
        if (code < 0).any() or (code > levels).any() or ((code * d - sup).abs() > 1e-5 * sup.abs() + 1e-30).any():
            raise ConfigError(f"qparams are not on the {fmt.kind} scale grid (quantize with --wformat {fmt.kind})")
        return d[..., 0], code.reshape(rows, groups).to(torch.int32)

    d, sc = split(scale, fmt.scale_levels)
    if not fmt.has_min:
        return d, sc, None, None
    dmin, m = split(zero.float() * scale.float(), fmt.scale_levels)
    return d, sc, dmin, m


_FALLBACK = {"q4_k": (5, True), "q5_k": (5, False), "q6_k": (8, True)}  # llama.cpp: Q5_0, Q5_1, Q8_0


def fallback_spec(spec: QuantSpec, n_in: int) -> QuantSpec:
    """``spec`` for a row of ``n_in`` weights: a K-quant spec on rows not a multiple of 256 becomes the legacy
    32-weight type llama.cpp's quantizer falls back to (Q4_K → Q5_0 = symmetric INT5, Q5_K → Q5_1 = asymmetric
    INT5, Q6_K → Q8_0 = symmetric INT8, groups of 32); any other spec is returned unchanged."""
    fmt = spec.format
    if not isinstance(fmt, KQuantFormat) or n_in % SUPER == 0:
        return spec
    bits, symmetric = _FALLBACK[fmt.kind]
    return QuantSpec(IntFormat(bits, symmetric), PerGroup(32))


# llama.cpp's K-quant mixes (llama-quant.cpp ``llama_tensor_get_type``): a base K type and, for the value projection
# and the MLP output (``attn_v``, ``ffn_down``), more bits in some layers. The head and embeddings stay as they are
# in bitsmith (full precision); llama.cpp would give the head Q6_K.
GGUF_MIXES = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m")


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_spec(mix: str, spec: QuantSpec, role: str | None, layer: int, n_layers: int) -> QuantSpec:
    """The spec of one linear under llama.cpp's ``mix`` (``q4_k_m`` …) with base ``spec`` (its K type): ``role`` is
    ``attn_v``, ``ffn_down`` or None (every other linear keeps ``spec``); ``layer`` of ``n_layers``."""
    if mix not in GGUF_MIXES:
        raise ConfigError(f"unknown GGUF mix {mix!r}; use one of {', '.join(GGUF_MIXES)}")
    if role not in ("attn_v", "ffn_down"):
        return spec
    if mix.endswith("_m"):
        more = _use_more_bits(layer, n_layers)
        kind = "q6_k" if more else spec.format.name
    elif mix == "q4_k_s":
        more = layer < 4 if role == "attn_v" else layer < n_layers // 8
        kind = "q5_k" if more else spec.format.name
    else:  # q5_k_s: the base type everywhere
        kind = spec.format.name
    fmt = KQuantFormat(kind)
    return QuantSpec(fmt, PerGroup(fmt.sub_block))
