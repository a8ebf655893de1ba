"""Fused W4 dequantize-matmul in Triton: ``y = x · dequant(qweight)ᵀ`` straight from PackedLinear's buffers.

Input layout (that of :mod:`bitsmith.formats.packing` and :class:`~bitsmith.nn.PackedLinear`):

* ``qweight`` ``(N, ceil(K / 8))`` int32: row ``n`` holds the 4-bit codes of weight row ``n`` as one
  little-endian bit stream, code ``k`` in bits ``4·(k % 8) … 4·(k % 8) + 3`` of word ``k // 8`` (unused high
  nibbles of a last partial word are 0). Symmetric codes are stored offset by +8.
* ``scale`` ``(N, G)`` (``(1, 1)`` per tensor), any float dtype; ``zero`` ``(N, G)`` uint8 or None (symmetric:
  the constant 8). Column ``k`` belongs to group ``k // group_size``, so a ragged last group (``K % g != 0``)
  needs nothing special.
* ``w[n, k] = (code − zero) · scale``; products are accumulated in fp32 and ``y`` is written in ``x.dtype``
  (fp16, bf16 or fp32).

Two kernels:

* :func:`_w4_gemv_kernel` (``M ≤ GEMV_MAX_M`` tokens, decode): a program takes ``BLOCK_M ≤ 8`` tokens and
  ``BLOCK_N`` rows and walks the rows' packed words, ``BLOCK_KW`` per step, one word per thread and row (the
  threads span the words, so x is read in the same layout and nothing moves between threads until the final
  sum). Each word is read from memory once; its 8 nibbles are unpacked in registers without an int→float
  conversion: nibble ``j`` OR-ed into the bits of 1.0f reads as ``1 + code·2^(p−23)`` (``p`` its bit position),
  ``fma(f, s, −s)`` is ``code·s·2^(p−23)`` with one rounding, and x is pre-scaled by the exact ``2^(23−p)``. That
  is one LOP3 and one FMA per weight, plus one FMA per weight and token. The zero points are applied once per
  (row, group) after the main loop, as ``Σ_g s·z·Σ_{k∈g} x``. Token blocks are the fastest grid axis, so the
  programs that share rows read the same words while they are in L2.
* :func:`_w4_tiled_kernel` (``M > GEMV_MAX_M``: prefill): a tiled GEMM; each ``BLOCK_K`` tile of codes (inside
  one group: ``BLOCK_K`` divides ``group_size``) is dequantized in registers and multiplied with ``tl.dot``
  (tensor cores for fp16/bf16; exact fp32 for fp32 inputs). Not tuned further than the autotuner's choice.

On an accelerator, layers with at least ``AUTOTUNE_MIN_WEIGHTS`` weights pick their tile sizes with
``triton.autotune`` at the first call per shape (a few seconds, once per process; Triton caches the compiled
kernels on disk); smaller layers use fixed tiles. With ``TRITON_INTERPRET=1`` set before this module is first
imported, the kernels run in Triton's interpreter on CPU tensors (slow; used by the tests).
"""

from __future__ import annotations

import logging

import torch

from ...utils.device import is_accelerator

log = logging.getLogger(__name__)

try:  # optional dependency: pip install -e ".[gpu]"
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

#: largest number of tokens (rows of x) that uses the GEMV kernel (up to 8 per program); more go to the tiled one
GEMV_MAX_M = 16
#: layers with fewer weights than this use fixed tile sizes (no autotuning; they are launch-bound anyway)
AUTOTUNE_MIN_WEIGHTS = 1 << 22
# In the tiled kernel, 8388608.0 = 2^23: the float32 with bits 0x4B000000 | c is 2^23 + c for 0 <= c < 2^23.

if triton is not None:

    @triton.jit
    def _w4_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, KW,
        stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, ONE,
        ZERO_CONST: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_GROUPS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    ):
        """y[m, n] = Σ_k x[m, k]·code[n, k]·s[n, g] − Σ_g s[n, g]·z[n, g]·Σ_{k∈g} x[m, k], g = k // GROUP_SIZE
        (GROUP_SIZE 0: one group per row). Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),), token block fastest.

        Tiles are 3-D (tokens, rows, words) with the word index spread over the threads and one word per
        thread and row: the 8 nibbles of a word and the BLOCK_M tokens stay in registers, so every weight is
        dequantized once for all tokens and no data moves between threads until the final sum."""
        pid = tl.program_id(0)
        m_blocks = tl.cdiv(M, BLOCK_M)
        offs_m = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (pid // m_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        toks = offs_m[:, None, None]
        rows = offs_n[None, :, None]
        n_mask = rows < N
        x_rows = x_ptr + toks.to(tl.int64) * stride_xm  # (BM, 1, 1)
        w_rows = qw_ptr + rows * stride_qn  # (1, BN, 1)
        if GROUP_SIZE == 0:
            s = tl.load(s_ptr + rows * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            # contiguity 1 keeps the words in the threads' layout of x (no vector load, no layout conversion)
            offs_kw = tl.max_contiguous(kw0 + tl.arange(0, BLOCK_KW), [1])[None, None, :]
            mask = n_mask & (offs_kw < KW)
            words = tl.load(w_rows + offs_kw, mask=mask, other=0)  # (1, BN, BKW)
            if GROUP_SIZE != 0:
                s = tl.load(s_ptr + rows * stride_sn + offs_kw // (GROUP_SIZE // 8), mask=mask,
                            other=0.0).to(tl.float32)
            high = words >> 12
            for j in tl.static_range(8):
                k = offs_kw * 8 + j
                xj = tl.load(x_rows + k, mask=(toks < M) & (k < K), other=0.0).to(tl.float32)  # (BM, 1, BKW)
                # Nibble j sits at bit pos = 4j (j < 5) or 4j − 12 in words >> 12 (j ≥ 5). OR-ed into the bits of
                # 1.0f (ONE = 0x3F800000) it reads as 1 + code·2^(pos−23); fma(f, s, −s) = code·s·2^(pos−23)
                # rounded once, and x is scaled by the exact power of two 2^(23−pos).
                if j < 5:
                    bits = (words & (15 << (4 * j))) | ONE
                    xj = xj * (2.0 ** (23 - 4 * j))
                else:
                    bits = (high & (15 << (4 * j - 12))) | ONE
                    xj = xj * (2.0 ** (35 - 4 * j))
                w = tl.fma(bits.to(tl.float32, bitcast=True), s, -s)
                acc = tl.fma(w, xj, acc)
        y = tl.sum(acc, axis=2)  # (BM, BN)
        # zero-point term, Σ_g s·z·(Σ_{k∈g} x): read x once more, and the qparams once per (row, group)
        tok_mask = (offs_m < M)[:, None]
        x_tok = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
        if GROUP_SIZE == 0:
            xsum = tl.zeros((BLOCK_M, 512), dtype=tl.float32)
            for k0 in range(0, K, 512):
                kk = k0 + tl.arange(0, 512)[None, :]
                xsum += tl.load(x_tok + kk, mask=tok_mask & (kk < K), other=0.0).to(tl.float32)
            s_row = tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z_row = tl.load(z_ptr + offs_n * stride_zn, mask=offs_n < N, other=0).to(tl.float32)
            else:
                z_row = tl.zeros((BLOCK_N,), dtype=tl.float32) + ZERO_CONST
            y = y - tl.sum(xsum, axis=1)[:, None] * (s_row * z_row)[None, :]
        else:
            n_groups = tl.cdiv(K, GROUP_SIZE)
            zt = tl.zeros((BLOCK_M, BLOCK_N, ZERO_GROUPS), dtype=tl.float32)
            for g0 in range(0, n_groups, ZERO_GROUPS):
                offs_g = g0 + tl.arange(0, ZERO_GROUPS)
                kk = offs_g[None, :, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, None, :]  # (1, BG, GS)
                xg = tl.load(x_tok[:, :, None] + kk, mask=tok_mask[:, :, None] & (kk < K), other=0.0)
                xg = tl.sum(xg.to(tl.float32), axis=2)  # (BM, BG)
                gmask = (offs_n < N)[:, None] & (offs_g < n_groups)[None, :]
                sg = tl.load(s_ptr + offs_n[:, None] * stride_sn + offs_g[None, :], mask=gmask,
                             other=0.0).to(tl.float32)
                if HAS_ZERO:
                    zg = tl.load(z_ptr + offs_n[:, None] * stride_zn + offs_g[None, :], mask=gmask,
                                 other=0).to(tl.float32)
                else:
                    zg = tl.zeros((BLOCK_N, ZERO_GROUPS), dtype=tl.float32) + ZERO_CONST
                zt += (sg * zg)[None, :, :] * xg[:, None, :]
            y = y - tl.sum(zt, axis=2)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=tok_mask & (offs_n < N)[None, :])

    @triton.jit
    def _w4_tiled_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, M_BUCKET,
        stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
        ZERO_CONST: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Same product as the GEMV kernel, tiled (BLOCK_M, BLOCK_N) with a ``tl.dot`` per BLOCK_K columns;
        BLOCK_K divides GROUP_SIZE. ``M_BUCKET`` only keys the autotuner. Grid: (cdiv(N, BLOCK_N),
        cdiv(M, BLOCK_M))."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_cols = qw_ptr + offs_n[None, :] * stride_qn
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zm = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32) + 8388608.0
        else:
            zm = tl.zeros((BLOCK_N,), dtype=tl.float32) + (8388608.0 + ZERO_CONST)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            words = tl.load(w_cols + (k // 8)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
            if GROUP_SIZE != 0:
                g = k0 // GROUP_SIZE
                s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32)
                    zm = z + 8388608.0
            bits = ((words >> ((k % 8) * 4)[:, None]) & 0xF) | 0x4B000000
            w = (bits.to(tl.float32, bitcast=True) - zm[None, :]) * s[None, :]  # (BLOCK_K, BLOCK_N)
            if x_ptr.dtype.element_ty == tl.float32:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    INTERPRETED = not isinstance(_w4_gemv_kernel, triton.runtime.jit.JITFunction)
else:
    INTERPRETED = False

# Autotuner candidates. GEMV, per BLOCK_M: (BLOCK_N, BLOCK_KW, num_warps) — one word per thread and row when
# BLOCK_KW = 32·num_warps; the registers hold BLOCK_M·BLOCK_N accumulators per word. Tiled: (BLOCK_M, BLOCK_N,
# num_warps, num_stages).
_GEMV_CONFIGS = {
    1: [(8, 128, 4), (16, 128, 4), (32, 128, 4), (16, 256, 8), (32, 256, 8), (16, 64, 2), (32, 64, 2)],
    2: [(8, 128, 4), (16, 128, 4), (8, 256, 8), (16, 256, 8)],
    4: [(4, 128, 4), (8, 128, 4), (4, 256, 8), (8, 256, 8)],
    8: [(2, 128, 4), (4, 128, 4), (4, 256, 8), (8, 128, 8)],
}
_TILED_CONFIGS = [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3),
                  (128, 128, 8, 3)]
_GEMV_FIXED = {1: (16, 128, 4), 2: (8, 128, 4), 4: (4, 128, 4), 8: (4, 128, 4)}  # layers too small to tune
_GEMV_INTERPRETED = (64, 32, 4)  # few, large programs: the interpreter's cost is per program and per op
_ONE = 0x3F800000  # bits of 1.0f, passed at run time so that it stays in a register
_tuned: dict[object, object] = {}


def available(device: torch.device | str) -> bool:
    """True when Triton is importable and the kernels can run on ``device``: compiled on an accelerator, or
    interpreted (any device) when ``TRITON_INTERPRET=1`` was set before this module was imported."""
    return triton is not None and (INTERPRETED or is_accelerator(device))


def _autotuned(block_m: int | None):
    """The autotuned GEMV kernel for ``block_m`` tokens per program, or (None) the tiled kernel; built on
    first use."""
    if block_m not in _tuned:
        if not _tuned:
            log.info("W4 kernel: tile sizes are autotuned at the first call per layer shape (a few seconds each)")
        if block_m is None:
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                       for bm, bn, w, st in _TILED_CONFIGS]
            _tuned[None] = triton.autotune(configs, key=["N", "K", "GROUP_SIZE", "M_BUCKET"])(_w4_tiled_kernel)
        else:
            configs = [triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w)
                       for bn, bkw, w in _GEMV_CONFIGS[block_m]]
            _tuned[block_m] = triton.autotune(configs, key=["N", "K", "GROUP_SIZE"])(_w4_gemv_kernel)
    return _tuned[block_m]


def _block_k(group_size: int) -> int:
    """Columns per tile of the tiled kernel: 64, or the group size when it is smaller (16 or 32)."""
    return min(64, group_size) if group_size else 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def w4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              group_size: int, zero_const: int = 8, method: str = "auto") -> torch.Tensor:
    """``x (M, K) · dequant(qweight)ᵀ`` → ``(M, N)`` in ``x.dtype`` (no bias), with the module docstring's layout.

    Args:
        x: ``(M, K)`` fp16/bf16/fp32 activations on the device of the buffers.
        qweight: ``(N, ceil(K / 8))`` int32 packed 4-bit codes.
        scale: ``(N, G)`` or ``(1, 1)``; zero: uint8 of the same shape, or None (then ``zero_const`` is used).
        group_size: columns per group (a power of two ≥ 16), or 0 for one group per row / per tensor.
        method: ``"auto"`` (GEMV for ``M ≤ GEMV_MAX_M``, else tiled), ``"gemv"`` or ``"tiled"``.
    """
    if triton is None:
        raise RuntimeError('the fused W4 kernel needs Triton; pip install -e ".[gpu]"')
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or qweight.shape[1] != _cdiv(k, 8):
        raise ValueError(f"qweight must be int32 of shape ({n}, {_cdiv(k, 8)}) for {k} inputs, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if group_size and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"group size {group_size} is not a power of two ≥ 16; use the reference path")
    if method not in ("auto", "gemv", "tiled"):
        raise ValueError(f"unknown method {method!r}; use auto, gemv or tiled")
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    scale = scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    stride_sn = scale.stride(0) if scale.shape[0] == n else 0
    stride_zn = 0 if zero is None else (zero.stride(0) if zero.shape[0] == n else 0)
    args = (x, qweight, scale, scale if zero is None else zero, y)
    strides = (x.stride(0), qweight.stride(0), stride_sn, stride_zn, y.stride(0))
    consts = {"ZERO_CONST": zero_const, "HAS_ZERO": zero is not None, "GROUP_SIZE": group_size}
    tune = not INTERPRETED and n * k >= AUTOTUNE_MIN_WEIGHTS
    if method == "gemv" or (method == "auto" and m <= GEMV_MAX_M):
        bm = min(triton.next_power_of_2(m), 8)
        consts["ZERO_GROUPS"] = max(512 // group_size, 1) if group_size else 1  # groups per zero-term tile
        m_blocks, kw = _cdiv(m, bm), qweight.shape[1]
        if tune:
            grid = lambda meta: (m_blocks * _cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            _autotuned(bm)[grid](*args, m, n, k, kw, *strides, _ONE, **consts, BLOCK_M=bm)
        else:
            bn, bkw, warps = _GEMV_INTERPRETED if INTERPRETED else _GEMV_FIXED[bm]
            _w4_gemv_kernel[(m_blocks * _cdiv(n, bn),)](*args, m, n, k, kw, *strides, _ONE, **consts,
                                                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps)
        return y
    bucket = min(triton.next_power_of_2(m), 4096)
    consts["BLOCK_K"] = _block_k(group_size)
    if tune:
        grid = lambda meta: (_cdiv(n, meta["BLOCK_N"]), _cdiv(m, meta["BLOCK_M"]))  # noqa: E731
        _autotuned(None)[grid](*args, m, n, k, bucket, *strides, **consts)
    else:
        bm, bn = min(max(bucket, 16), 64), 64
        _w4_tiled_kernel[(_cdiv(n, bn), _cdiv(m, bm))](*args, m, n, k, bucket, *strides, **consts,
                                                       BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


__all__ = ["available", "w4_linear", "GEMV_MAX_M", "AUTOTUNE_MIN_WEIGHTS", "INTERPRETED"]
