"""Bit packing: hand-computed golden words, a pure-Python bit-stream reference, round trips, errors, bpw."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats.packing import (
    bits_per_weight, pack_fp4, pack_int, packed_nbytes, packed_words, storage_bits, unpack_fp4, unpack_int,
)

ALL_BITS = range(1, 9)


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """Independent oracle: build the little-endian stream as one Python int, cut it into signed 32-bit words."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    words = []
    for w in range(math.ceil(len(codes) * bits / 32)):
        u = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(u - (1 << 32) if u >= 1 << 31 else u)
    return words


# --- golden values, computed by hand --------------------------------------------------------------------------

def test_pack_int4_golden() -> None:
    # 0x87654321: code 0 (=1) in the lowest nibble, code 7 (=8) in the highest; bit 31 set -> negative int32.
    packed = pack_int(_t([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [-2023406815]
    assert 0x87654321 - 2**32 == -2023406815


def test_pack_int4_partial_word_pads_with_zero() -> None:
    # 3 codes = 12 bits: 0x00000FA5 = 0b1111_1010_0101 (codes 5, 10, 15), the upper 20 bits zero.
    assert pack_int(_t([5, 10, 15]), 4).tolist() == [0xFA5]


def test_pack_int2_golden() -> None:
    # [0, 1, 2, 3] at 2 bits = 0b11_10_01_00 = 0xE4 per byte; 16 codes -> 0xE4E4E4E4 = -454761244 as int32.
    assert pack_int(_t([0, 1, 2, 3] * 4), 2).tolist() == [0xE4E4E4E4 - 2**32] == [-454761244]
    # 17 codes need a second word; code 16 (=3) lands in bits 0..1 of word 1.
    assert pack_int(_t([0] * 16 + [3]), 2).tolist() == [0, 3]


def test_pack_int8_golden() -> None:
    # Bytes little-endian: [0x01, 0x02, 0x03, 0xFF] -> 0xFF030201 = -16580095; [0x7F] alone -> 127.
    assert pack_int(_t([1, 2, 3, 255, 127]), 8).tolist() == [0xFF030201 - 2**32, 127]
    assert 0xFF030201 - 2**32 == -16580095


def test_pack_int3_crosses_word_boundary() -> None:
    codes = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 6, 7]  # 12 codes x 3 bits = 36 bits -> 2 words
    # Word 0 holds codes 0..9 at bit offsets 0, 3, ..., 27, plus the low 2 bits of code 10 at bits 30..31:
    #   1 + (2<<3) + (3<<6) + (4<<9) + (5<<12) + (6<<15) + (7<<18) + (0<<21) + (1<<24) + (2<<27)
    #   = 1 + 16 + 192 + 2048 + 20480 + 196608 + 1835008 + 0 + 16777216 + 268435456 = 287267025
    #   code 10 = 6 = 0b110: low bits 0b10 -> bit 31 set, bit 30 clear: + 2**31 = 2434750673 (unsigned)
    #   as int32: 2434750673 - 2**32 = -1860216623
    # Word 1: bit 0 = high bit of code 10 (1); bits 1..3 = code 11 (7 << 1 = 14): 1 + 14 = 15.
    assert 287267025 + 2**31 - 2**32 == -1860216623
    packed = pack_int(_t(codes), 3)
    assert packed.tolist() == [-1860216623, 15]
    assert unpack_int(packed, 3, 12).tolist() == codes


def test_pack_int3_single_code_straddles() -> None:
    # Code 10 = 5 = 0b101 occupies stream bits 30, 31, 32: word 0 bit 30 (1), bit 31 (0); word 1 bit 0 (1).
    assert pack_int(_t([0] * 10 + [5]), 3).tolist() == [0x40000000, 1]


def test_pack_int3_32_codes_fill_three_words() -> None:
    assert pack_int(torch.full((32,), 7), 3).tolist() == [-1, -1, -1]
    assert pack_int(torch.full((33,), 7), 3).tolist() == [-1, -1, -1, 7]


def test_pack_fp4_golden() -> None:
    # Element 2j in the low nibble, 2j+1 in the high nibble; odd n pads the last high nibble with 0.
    packed = pack_fp4(_t([1, 2, 3, 4, 15]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x21, 0x43, 0x0F]
    assert pack_fp4(_t([0xA, 0x5, 0x0, 0xF])).tolist() == [0x5A, 0xF0]
    assert unpack_fp4(packed, 5).tolist() == [1, 2, 3, 4, 15]


# --- matches the independent reference, round trips ----------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 67, 100])
def test_pack_int_matches_reference_and_round_trips(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    packed = pack_int(codes, bits)
    assert packed.shape == (math.ceil(n * bits / 32),)
    assert packed.tolist() == _reference_pack(codes.tolist(), bits)
    out = unpack_int(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out.to(torch.int64), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("fill", ["zeros", "max"])
def test_round_trip_extremes_with_batch_dims(bits: int, fill: str) -> None:
    value = 0 if fill == "zeros" else 2**bits - 1
    codes = torch.full((2, 3, 45), value, dtype=torch.uint8)
    packed = pack_int(codes, bits)
    assert packed.shape == (2, 3, math.ceil(45 * bits / 32))
    assert packed.tolist()[1][2] == _reference_pack([value] * 45, bits)
    assert torch.equal(unpack_int(packed, bits, 45), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_pack_int_accepts_any_integer_dtype(dtype: torch.dtype) -> None:
    assert pack_int(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=dtype), 4).tolist() == [-2023406815]


def test_batch_rows_packed_independently() -> None:
    codes = torch.stack([_t([1, 2, 3, 4, 5, 6, 7, 8]), _t([0] * 8), _t([15] * 8)]).reshape(3, 1, 8)
    assert pack_int(codes, 4).reshape(-1).tolist() == [-2023406815, 0, -1]


def test_empty_last_dim() -> None:
    packed = pack_int(torch.zeros(2, 0, dtype=torch.int64), 3)
    assert packed.shape == (2, 0) and packed.dtype == torch.int32
    assert unpack_int(packed, 3, 0).shape == (2, 0)
    assert pack_fp4(torch.zeros(0, dtype=torch.uint8)).shape == (0,)


def test_unpack_int_ignores_trailing_bits() -> None:
    # 3 codes of 4 bits use bits 0..11; garbage above them must not leak into the codes.
    assert unpack_int(torch.tensor([0x7FFFFA51], dtype=torch.int32), 4, 3).tolist() == [1, 5, 10]


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(1, 8),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 130),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(bits: int, batch: list[int], n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*batch, n), generator=gen, dtype=torch.int64)
    packed = pack_int(codes, bits)
    assert packed.shape == (*batch, packed_words(n, bits))
    assert packed.reshape(-1, packed.shape[-1])[0].tolist() == _reference_pack(codes.reshape(-1, n)[0].tolist(), bits)
    assert torch.equal(unpack_int(packed, bits, n).to(torch.int64), codes)


@settings(max_examples=50, deadline=None)
@given(batch=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.integers(1, 65), seed=st.integers(0, 2**31 - 1))
def test_fp4_round_trip_property(batch: list[int], n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (*batch, n), generator=gen, dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (*batch, (n + 1) // 2)
    first = codes.reshape(-1, n)[0].tolist()
    assert packed.reshape(-1, packed.shape[-1])[0, 0].item() == first[0] | ((first[1] if n > 1 else 0) << 4)
    assert torch.equal(unpack_fp4(packed, n), codes)


def test_fp4_pack_equals_int4_stream_bytes() -> None:
    # Same little-endian nibble order: the int32 words of pack_int(bits=4) viewed as bytes are pack_fp4's bytes.
    codes = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0))
    if sys.byteorder != "little":
        pytest.skip("int32 -> bytes view follows host byte order")
    assert torch.equal(pack_int(codes, 4).view(torch.uint8), pack_fp4(codes))


# --- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 9, 16, -1])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"1\.\.8.*{bits}"):
        pack_int(_t([0]), bits)
    with pytest.raises(ValueError, match=rf"1\.\.8.*{bits}"):
        unpack_int(torch.zeros(1, dtype=torch.int32), bits, 1)


@pytest.mark.parametrize(("bits", "bad"), [(4, 16), (2, 4), (8, 256), (3, -1), (1, 2)])
def test_codes_out_of_range(bits: int, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"found {bad}\b"):
        pack_int(_t([0, bad, 1]), bits)


def test_fp4_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match="found 16"):
        pack_fp4(_t([1, 16]))
    with pytest.raises(ValueError, match="found -3"):
        pack_fp4(torch.tensor([-3, 1], dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=str(dtype)):
        pack_int(torch.zeros(4, dtype=dtype), 4)
    with pytest.raises(ValueError, match=str(dtype)):
        pack_fp4(torch.zeros(4, dtype=dtype))


def test_unpack_errors() -> None:
    with pytest.raises(ValueError, match="torch.int64"):
        unpack_int(torch.zeros(1, dtype=torch.int64), 4, 8)
    with pytest.raises(ValueError, match=r"2 words.*n=8.*need 1"):
        unpack_int(torch.zeros(2, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="-1"):
        unpack_int(torch.zeros(0, dtype=torch.int32), 4, -1)
    with pytest.raises(ValueError, match="torch.int32"):
        unpack_fp4(torch.zeros(2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"3 bytes.*n=4.*need 2"):
        unpack_fp4(torch.zeros(3, dtype=torch.uint8), 4)


def test_zero_dim_rejected() -> None:
    with pytest.raises(ValueError, match="0-d"):
        pack_int(torch.tensor(3), 4)


# --- accounting ---------------------------------------------------------------------------------------------

def test_bpw_int4_g128_asymmetric() -> None:
    # fp16 scale + 4-bit zero per group of 128: 4 + 16/128 + 4/128 = 4.15625 (OmniQuant quotes 4.16).
    assert bits_per_weight(128, 4, 1, 16, 1, 4) == 4.15625
    rows, cols = 4096, 4096
    groups = rows * cols // 128
    assert storage_bits(rows * cols, 4, groups, 16, groups, 4) == rows * cols * 4 + groups * 20
    assert bits_per_weight(rows * cols, 4, groups, 16, groups, 4) == 4.15625
    assert round(bits_per_weight(128, 4, 1, 16, 1, 4), 2) == 4.16


def test_bpw_per_channel() -> None:
    # W4 per output channel, 4096 inputs per row, fp16 scale + fp16 zero per row: 4 + 32/4096 = 4.0078125.
    assert bits_per_weight(11008 * 4096, 4, 11008, 16, 11008, 16) == 4.0078125
    # Symmetric per-channel W8 with fp16 scale only: 8 + 16/4096.
    assert bits_per_weight(4096, 8, 1) == 8 + 16 / 4096
    # extra_bits: NVFP4-style per-tensor fp32 global scale on top of e4m3 scales per 16.
    assert storage_bits(1024, 4, 64, 8, extra_bits=32) == 1024 * 4 + 64 * 8 + 32


def test_accounting_errors() -> None:
    with pytest.raises(ValueError, match="n_codes.*0"):
        bits_per_weight(0, 4, 0)
    with pytest.raises(ValueError, match="scale_bits.*-16"):
        storage_bits(128, 4, 1, -16)
    with pytest.raises(ValueError, match="code_bits.*4.5"):
        storage_bits(128, 4.5, 1)  # type: ignore[arg-type]


def test_packed_nbytes() -> None:
    assert packed_nbytes(4096, 4) == 2048
    assert packed_nbytes(10, 3) == 4  # 30 bits -> one word
    assert packed_nbytes(11, 3) == 8  # 33 bits -> two words
    assert packed_nbytes(0, 4) == 0
    for bits in ALL_BITS:
        for n in (1, 7, 32, 100):
            assert packed_nbytes(n, bits) == pack_int(torch.zeros(n, dtype=torch.uint8), bits).numel() * 4
    with pytest.raises(ValueError, match="9"):
        packed_nbytes(8, 9)
