"""bitsmith's K-quant codes (:mod:`bitsmith.formats.kquant`) in llama.cpp's super-block byte layouts.

Per 256-weight super-block (ggml-common.h ``block_q4_K`` / ``block_q5_K`` / ``block_q6_K``):

* ``Q4_K`` (144 bytes): ``d``, ``dmin`` (fp16), 12 bytes of eight 6-bit scales and eight 6-bit minima (bytes 0–3:
  scales 0–3 + the top 2 bits of scales 4–7; bytes 4–7: minima 0–3 + the top 2 bits of minima 4–7; bytes 8–11: low
  nibbles of scales 4–7 | low nibbles of minima 4–7 << 4), 128 bytes of codes: byte ``32c + l`` holds sub-block
  ``2c``'s code ``l`` in its low nibble and sub-block ``2c + 1``'s in its high nibble;
* ``Q5_K`` (176 bytes): as Q4_K plus 32 bytes ``qh`` before the codes: bit ``j`` of ``qh[l]`` is the fifth bit of
  sub-block ``j``'s code ``l``;
* ``Q6_K`` (210 bytes): 128 bytes of low nibbles (weight ``128h + 64k + j`` in byte ``64h + j``, nibble ``k``),
  64 bytes of high 2-bit pairs (weight ``128h + 32s + l`` in byte ``32h + l``, bits ``2s``), sixteen int8 scales,
  ``d`` (fp16).

The codes are bitsmith's, copied; ``d``, ``dmin`` and the 6/8-bit scale codes are recovered exactly from the
sub-block qparams (:func:`~bitsmith.formats.kquant.super_block_params`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ExportError
from ..formats import QuantizedTensor
from ..formats.kquant import SUPER, KQuantFormat, super_block_params


def _fp16(x: torch.Tensor) -> np.ndarray:
    """``(rows, S)`` → ``(rows, S, 2)`` bytes."""
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def _scales_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minima ``(rows, S, 8)`` → llama.cpp's 12 bytes ``(rows, S, 12)``."""
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    first = lo_s | ((hi_s >> 4) << 6)
    second = lo_m | ((hi_m >> 4) << 6)
    third = (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=-1).astype(np.uint8)


def _q4_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes ``(rows, S, 256)`` (low 4 bits used) → 128 bytes per super-block."""
    q = (q & 0x0F).reshape(*q.shape[:2], 4, 2, 32)
    return (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(*q.shape[:2], 128).astype(np.uint8)


def encode_kquant(name: str, qt: QuantizedTensor) -> np.ndarray:
    """``uint8 (out, in / 256 · type_size)``: the GGUF rows of a K-quant layer ``(out, in)``."""
    fmt = qt.spec.format
    assert isinstance(fmt, KQuantFormat)
    rows, n_in = qt.codes.shape
    try:
        d, sc, dmin, m = super_block_params(fmt, qt.scale, qt.zero)
    except ValueError as e:
        raise ExportError(f"layer {name}: {e}") from None
    n_super = n_in // SUPER
    q = qt.codes.to(torch.int64).numpy().reshape(rows, n_super, SUPER)
    sc = sc.numpy().reshape(rows, n_super, -1)
    if fmt.kind == "q6_k":
        low = (q & 0x0F).reshape(rows, n_super, 2, 2, 64)
        ql = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(rows, n_super, 128)
        high = ((q >> 4) & 0x03).reshape(rows, n_super, 2, 4, 32)
        qh = sum(high[:, :, :, s] << (2 * s) for s in range(4)).reshape(rows, n_super, 64)
        parts = [ql.astype(np.uint8), qh.astype(np.uint8), sc.astype(np.int8).view(np.uint8), _fp16(d)]
    else:
        m = m.numpy().reshape(rows, n_super, -1)
        parts = [_fp16(d), _fp16(dmin), _scales_min_k4(sc, m)]
        if fmt.kind == "q5_k":
            fifth = ((q >> 4) & 1).reshape(rows, n_super, 8, 32)
            parts.append(sum(fifth[:, :, j] << j for j in range(8)).astype(np.uint8))
        parts.append(_q4_nibbles(q))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
