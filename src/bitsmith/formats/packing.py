"""Bit packing of quantized codes and bits-per-weight accounting (pure tensor functions).

Integer codes (:func:`pack_int` / :func:`unpack_int`) are packed into ``int32`` words as **one little-endian
bit stream** along the last dim: code ``i`` of width ``b`` occupies stream bits ``[i·b, (i+1)·b)`` and stream
bit ``k`` is bit ``k % 32`` of word ``k // 32``. For ``b`` = 1, 2, 4, 8 that is 32, 16, 8, 4 codes per word
with code 0 in the lowest bits (the GPTQ / compressed-tensors ``pack_to_int32`` order); for other widths
codes straddle word boundaries, so 32 codes always fill exactly ``b`` words (the GPTQ 3-bit idea, with
a plain stream order). Words are ``int32``: a word whose bit 31 is set reads as a negative number.

FP4 (E2M1) codes (:func:`pack_fp4` / :func:`unpack_fp4`) go two per ``uint8`` byte, element ``2j`` in the
low nibble and ``2j+1`` in the high nibble (OCP MX / compressed-tensors nvfp4 convention).

:func:`storage_bits`, :func:`bits_per_weight` and :func:`packed_nbytes` count the storage a quantized
tensor needs.
"""

from __future__ import annotations

import math

import torch

MIN_PACK_BITS, MAX_PACK_BITS = 1, 8
WORD_BITS = 32

_INT_DTYPES = frozenset({
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64,
})
_U32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_PACK_BITS <= bits <= MAX_PACK_BITS:
        raise ValueError(f"bits must be an integer in {MIN_PACK_BITS}..{MAX_PACK_BITS}, got {bits!r}")


def _check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Validate integer codes in ``[0, 2**bits)`` with at least one dim; return them as int64."""
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in _INT_DTYPES:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dim (packing runs along the last dim), got a 0-d tensor")
    wide = codes.to(torch.int64)
    if wide.numel():
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi >= 1 << bits:
            bad = lo if lo < 0 else hi
            raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, found {bad}")
    return wide


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 codes of one group (which fill exactly ``bits`` words): the word each code starts in
    and its bit offset there."""
    start = torch.arange(WORD_BITS, dtype=torch.int64, device=device) * bits
    return start // WORD_BITS, start % WORD_BITS


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits: ``ceil(n·bits / 32)``."""
    _check_n(n)
    _check_bits(bits)
    return -(-n * bits // WORD_BITS)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of one row of ``n`` codes packed by :func:`pack_int`: ``4 · ceil(n·bits / 32)``.

    E.g. ``packed_nbytes(4096, 4) == 2048``, ``packed_nbytes(10, 3) == 4`` (30 bits, one word).
    """
    return 4 * packed_words(n, bits)


def pack_int(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes along the last dim into int32 words (one little-endian bit stream).

    Args:
        codes: integer tensor (any integer dtype) of shape ``(..., n)`` with values in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        ``torch.int32`` tensor of shape ``(..., ceil(n·bits / 32))`` on ``codes``' device.

    Layout: code ``i`` occupies stream bits ``[i·bits, (i+1)·bits)``; stream bit ``k`` is bit ``k % 32`` of
    word ``k // 32``. Unused trailing bits of the last word are 0. Worked examples::

        bits=4, codes [1, 2, 3, 4, 5, 6, 7, 8]
            word 0 = 0b 1000 0111 0110 0101 0100 0011 0010 0001 = 0x87654321
                        c7   c6   c5   c4   c3   c2   c1   c0     -> int32 -2023406815 (bit 31 set)

        bits=3, codes [0]*10 + [5]            (code 10 = 0b101 spans stream bits 30..32)
            word 0 = 0b 01 000...0   (bits 30,31 = low two bits of code 10: 1, 0) = 0x40000000
            word 1 = 0b 0...0 1      (bit 0     = high bit of code 10: 1)          = 0x00000001

    Raises:
        ValueError: ``bits`` outside 1..8, a non-integer dtype, a 0-d tensor, or a code outside
            ``[0, 2**bits)`` (the message names the offending value).
    """
    _check_bits(bits)
    wide = _check_codes(codes, bits)
    *batch, n = wide.shape
    n_words = -(-n * bits // WORD_BITS)
    groups = -(-n // WORD_BITS)
    # Zero-pad to whole groups of 32 codes; each group fills exactly `bits` words.
    wide = torch.nn.functional.pad(wide, (0, groups * WORD_BITS - n)).reshape(*batch, groups, WORD_BITS)
    word, offset = _layout(bits, wide.device)
    shifted = wide << offset  # < 2**39: fits int64; bits >= 32 spill into the next word
    # One spare word per group catches the (always zero) spill of the group's last code.
    out = torch.zeros(*batch, groups, bits + 1, dtype=torch.int64, device=wide.device)
    out.index_add_(-1, word, shifted & _U32)  # disjoint bit fields: add == or
    out.index_add_(-1, word + 1, shifted >> WORD_BITS)
    out = out[..., :bits].reshape(*batch, groups * bits)[..., :n_words]
    # [0, 2**32) -> int32 with two's-complement wrap-around.
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.to(torch.int32)


def unpack_int(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int`: ``unpack_int(pack_int(x, b), b, x.shape[-1]) == x``.

    Args:
        packed: ``torch.int32`` tensor of shape ``(..., ceil(n·bits / 32))`` laid out as in :func:`pack_int`.
        bits: code width, 1..8.
        n: number of codes per row.

    Returns:
        ``torch.uint8`` codes of shape ``(..., n)``. Unused trailing bits of the last word are ignored.

    Raises:
        ValueError: ``bits`` outside 1..8, ``n`` negative, ``packed`` not int32 or 0-d, or its last dim
            not equal to ``ceil(n·bits / 32)``.
    """
    _check_bits(bits)
    _check_n(n)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a torch.int32 tensor, got {got}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dim, got a 0-d tensor")
    n_words = -(-n * bits // WORD_BITS)
    if packed.shape[-1] != n_words:
        raise ValueError(
            f"packed has {packed.shape[-1]} words in its last dim, but n={n} codes of {bits} bits need {n_words}"
        )
    *batch, _ = packed.shape
    groups = -(-n // WORD_BITS)
    words = packed.to(torch.int64) & _U32  # reinterpret as unsigned 32-bit
    # Pad to whole groups plus one spare zero word per group so `word + 1` is always in range.
    words = torch.nn.functional.pad(words, (0, groups * bits - n_words)).reshape(*batch, groups, bits)
    words = torch.nn.functional.pad(words, (0, 1))
    word, offset = _layout(bits, words.device)
    stream = words[..., word] | (words[..., word + 1] << WORD_BITS)  # 64-bit window starting at `word`
    codes = (stream >> offset) & ((1 << bits) - 1)
    return codes.reshape(*batch, groups * WORD_BITS)[..., :n].to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit FP4 (E2M1) codes two per byte along the last dim.

    Args:
        codes: integer tensor of shape ``(..., n)`` with values 0..15, each the bit pattern
            ``sign | exponent (2 bits) | mantissa (1 bit)``.

    Returns:
        ``torch.uint8`` tensor of shape ``(..., ceil(n / 2))``: byte ``j = code[2j] | code[2j+1] << 4``
        (element ``2j`` in the low nibble); an odd ``n`` leaves the last high nibble 0. Worked example::

            codes [1, 2, 3, 4, 0xF]  ->  bytes [0x21, 0x43, 0x0F]
                  0b0010_0001, 0b0100_0011, 0b0000_1111

    Raises:
        ValueError: non-integer dtype, a 0-d tensor, or a code outside 0..15 (naming it).
    """
    wide = _check_codes(codes, 4)
    n = wide.shape[-1]
    wide = torch.nn.functional.pad(wide, (0, n % 2))
    return (wide[..., 0::2] | (wide[..., 1::2] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: ``uint8`` of shape ``(..., ceil(n / 2))`` -> ``uint8`` codes ``(..., n)``.

    Raises:
        ValueError: ``packed`` not uint8 or 0-d, ``n`` negative, or a last dim other than ``ceil(n / 2)``.
    """
    _check_n(n)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a torch.uint8 tensor, got {got}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dim, got a 0-d tensor")
    if packed.shape[-1] != -(-n // 2):
        raise ValueError(f"packed has {packed.shape[-1]} bytes in its last dim, but n={n} FP4 codes need {-(-n // 2)}")
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :n]


def storage_bits(
    n_codes: int,
    code_bits: int,
    n_scales: int,
    scale_bits: int = 16,
    n_zeros: int = 0,
    zero_bits: int = 0,
    extra_bits: int = 0,
) -> int:
    """Total storage bits of a quantized tensor (logical bits; word padding from packing is not counted):

        ``n_codes·code_bits + n_scales·scale_bits + n_zeros·zero_bits + extra_bits``

    ``extra_bits`` covers anything else stored once (e.g. a per-tensor second-level scale, 32 for NVFP4's
    fp32 global scale). A 4096×4096 INT4 weight, groups of 128, asymmetric with fp16 scales and 4-bit zero
    points: ``storage_bits(4096*4096, 4, 4096*32, 16, 4096*32, 4)``.

    Raises:
        ValueError: any argument negative or not an integer (naming it).
    """
    args = {"n_codes": n_codes, "code_bits": code_bits, "n_scales": n_scales, "scale_bits": scale_bits,
            "n_zeros": n_zeros, "zero_bits": zero_bits, "extra_bits": extra_bits}
    for name, value in args.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return n_codes * code_bits + n_scales * scale_bits + n_zeros * zero_bits + extra_bits


def bits_per_weight(
    n_codes: int,
    code_bits: int,
    n_scales: int,
    scale_bits: int = 16,
    n_zeros: int = 0,
    zero_bits: int = 0,
    extra_bits: int = 0,
) -> float:
    """Average storage bits per weight: :func:`storage_bits` ``/ n_codes``.

    Examples: INT4, group 128, asymmetric, fp16 scale and 4-bit zero per group:
    ``4 + 16/128 + 4/128 = 4.15625`` (OmniQuant, arXiv 2308.13137, quotes 4.16) —
    ``bits_per_weight(128, 4, 1, 16, 1, 4)``. Per-channel INT4 of rows of 4096 with fp16 scale and
    fp16 zero: ``4 + 32/4096 = 4.0078125``.

    Raises:
        ValueError: ``n_codes`` is 0, or any argument is negative or not an integer.
    """
    total = storage_bits(n_codes, code_bits, n_scales, scale_bits, n_zeros, zero_bits, extra_bits)
    if n_codes == 0:
        raise ValueError("n_codes must be positive to compute bits per weight, got 0")
    return total / n_codes


__all__ = [
    "pack_int", "unpack_int", "pack_fp4", "unpack_fp4", "packed_words", "packed_nbytes",
    "storage_bits", "bits_per_weight", "MIN_PACK_BITS", "MAX_PACK_BITS",
]
