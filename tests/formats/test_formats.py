"""Number formats: bit-exact against torch's float8 casts and brute-force grid references."""

from __future__ import annotations

import pytest
import torch

from bitsmith.formats import (
    E2M1, E2M3, E3M2, E4M3, E5M2, MAX_POW2_SHIFT, FPFormat, IntFormat, PerChannel, PerGroup, PerTensor, PerToken,
    QuantSpec, format_from_dict, make_format, spec_from_dict,
)

ALL_FP = [E4M3, E5M2, E3M2, E2M3, E2M1]


def _edge_values(fmt: FPFormat) -> torch.Tensor:
    """Every finite grid value, every midpoint between neighbours (ties), and points just around them."""
    grid = _grid(fmt)
    mids = (grid[1:] + grid[:-1]) / 2
    around = torch.cat([mids * (1 + 2**-20), mids * (1 - 2**-20)])
    vals = torch.cat([grid, mids, around])
    return torch.cat([vals, -vals])


def _grid(fmt: FPFormat) -> torch.Tensor:
    """Sorted non-negative finite values of ``fmt`` decoded from every code."""
    codes = torch.arange(2 ** (fmt.bits - 1), dtype=torch.uint8)
    vals = fmt.decode(codes)
    return torch.unique(vals[torch.isfinite(vals)])


def _brute_round(fmt: FPFormat, x: torch.Tensor) -> torch.Tensor:
    """Reference: nearest grid value by exhaustive search, ties to the code with even mantissa LSB."""
    codes = torch.arange(2 ** (fmt.bits - 1), dtype=torch.uint8)
    vals = fmt.decode(codes)
    keep = torch.isfinite(vals)
    codes, vals = codes[keep], vals[keep]
    a = x.abs().clamp(max=fmt.max_value)
    d = (a[:, None] - vals[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    ties = d == best
    even = (codes.to(torch.int32) & 1) == 0
    pick = torch.where((ties & even[None]).any(1), (ties & even[None]).float().argmax(1), ties.float().argmax(1))
    return torch.copysign(vals[pick], x)


@pytest.mark.parametrize("fmt,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_matches_torch_cast_bit_for_bit(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-20, 18, (20000,), generator=g).float())
    x = torch.cat([rand, _edge_values(fmt), torch.tensor([0.0, -0.0, 2.0**-9, 2.0**-16, fmt.max_value])])
    x = x[x.abs() <= fmt.max_value]  # beyond ±max we saturate; torch's cast is not saturating
    ref = x.to(dtype)
    q = fmt.round_arithmetic(x)  # bitsmith's own rounding, against torch's cast
    assert torch.equal(q, ref.float())
    assert torch.equal(fmt.round_to_grid(x), q)  # the fast path (torch's cast) gives the same values
    assert torch.equal(fmt.round_to_grid(x.bfloat16()), fmt.round_arithmetic(x.bfloat16()))
    assert torch.equal(torch.signbit(q), torch.signbit(ref.float()))  # -0.0 kept
    assert torch.equal(fmt.encode(q), ref.view(torch.uint8))


@pytest.mark.parametrize("fmt,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_decode_every_code_matches_torch(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).float()
    ours = fmt.decode(codes)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    assert torch.equal(ours[finite], ref[finite])


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_round_to_grid_matches_brute_force(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([_edge_values(fmt), torch.randn(3000, generator=g) * fmt.max_value / 3])
    x = x[x.abs() <= fmt.max_value]
    assert torch.equal(fmt.round_to_grid(x), _brute_round(fmt, x))
    assert torch.equal(fmt.round_arithmetic(x), _brute_round(fmt, x))


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_encode_decode_round_trip_every_code(fmt):
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
    vals = fmt.decode(codes)
    finite = torch.isfinite(vals)
    assert torch.equal(fmt.encode(vals[finite]), codes[finite])


def test_fp_format_constants():
    assert _grid(E2M1).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert (E4M3.max_value, E5M2.max_value, E3M2.max_value, E2M3.max_value, E2M1.max_value) == (
        448.0, 57344.0, 28.0, 7.5, 6.0)
    assert _grid(E4M3)[1].item() == 2.0**-9  # smallest subnormal
    assert _grid(E2M1).numel() == 8 and _grid(E3M2).numel() == 32  # no NaN/inf codes in MX formats


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_fp_saturates_beyond_max(fmt):
    x = torch.tensor([fmt.max_value * 1.01, -fmt.max_value * 5, 1e30])
    assert fmt.round_to_grid(x).tolist() == [fmt.max_value, -fmt.max_value, fmt.max_value]


def _int_reference(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Loop-based asymmetric min/max quantize-dequantize, one group at a time (ragged tail included)."""
    out = torch.empty_like(w)
    qmax = 2**bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            blk = w[r, c0:c0 + g]
            lo, hi = min(blk.min().item(), 0.0), max(blk.max().item(), 0.0)
            s = max((hi - lo) / qmax, 1e-9)
            z = round(-lo / s)
            q = torch.clamp(torch.round(blk / s) + z, 0, qmax)
            out[r, c0:c0 + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [32, 64, 172])
def test_int_asymmetric_matches_loop_reference(bits, g):
    w = torch.randn(6, 172, generator=torch.Generator().manual_seed(bits))
    spec = QuantSpec(IntFormat(bits), PerGroup(g))
    assert torch.allclose(spec.fake_quant(w), _int_reference(w, bits, g), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(), PerGroup(16), PerGroup(50)], ids=str)
def test_int_error_within_half_step_and_codes_in_range(bits, sym, gran):
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(3)) * 3
    spec = QuantSpec(IntFormat(bits, sym), gran)
    scale, zero = spec.qparams(w)
    qt = spec.quantize(w)
    fmt = spec.format
    assert int(qt.codes.min()) >= fmt.qmin and int(qt.codes.max()) <= fmt.qmax
    assert qt.codes.dtype == (torch.int8 if sym else torch.uint8)
    step = spec._blocks(w, scale)
    assert torch.all((qt.dequantize() - w).abs() <= step / 2 + 1e-6)
    assert torch.equal(qt.dequantize(), spec.fake_quant(w))
    if zero is not None:  # zero point is a valid code and 0.0 is exactly representable
        assert torch.all((zero >= 0) & (zero <= fmt.qmax))
        assert torch.all(spec.fake_quant(torch.zeros_like(w), scale, zero) == 0)


def test_ragged_group_uses_only_real_elements():
    w = torch.zeros(1, 10)
    w[0, 8:] = torch.tensor([1.0, 2.0])  # last group of PerGroup(4) holds 2 real elements
    w[0, :8] = -5.0
    xmin, xmax = QuantSpec(IntFormat(4), PerGroup(4)).block_minmax(w)
    assert xmin.shape == (1, 3, 1)
    assert xmin[0, 2, 0] == 1.0 and xmax[0, 2, 0] == 2.0
    spec = QuantSpec(IntFormat(4), PerGroup(4))
    assert spec.quantize(w).scale.shape == (1, 3)


def test_granularity_shapes_and_round_trip():
    x = torch.randn(2, 3, 70)
    for gran, groups in [(PerTensor(), (1, 1, 420)), (PerToken(), (6, 1, 70)), (PerGroup(32), (6, 3, 32))]:
        xg = gran.to_groups(x)
        assert tuple(xg.shape) == groups
        assert torch.equal(gran.from_groups(xg, x.shape), x)


def test_per_token_activation_scales_each_token():
    x = torch.randn(2, 4, 16)
    x[1, 2] *= 100.0
    spec = QuantSpec(IntFormat(8), PerToken())
    scale, _ = spec.qparams(x)
    assert scale.shape == (8, 1, 1)
    assert scale[6] > 50 * scale[0]  # token (1, 2) got its own range


@pytest.mark.parametrize("fmt", [E2M1, E4M3], ids=lambda f: f.name)
def test_fp_block_scale_error_bound(fmt):
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(fmt, PerGroup(32))
    qt = spec.quantize(w)
    scale = spec._blocks(w, qt.scale)
    # relative spacing of ExMy is 2^-M within a binade; absolute error ≤ half the largest step of the block
    top_step = scale * fmt.max_value * 2.0 ** (-fmt.mbits) / 2 * 2
    assert torch.all((qt.dequantize() - w).abs() <= top_step / 2 + 1e-7)
    assert torch.equal(qt.dequantize(), spec.fake_quant(w))
    assert torch.allclose(qt.scale.unsqueeze(-1), spec.block_minmax(w)[1].abs().maximum(
        spec.block_minmax(w)[0].abs()) / fmt.max_value)


def _row_pow2_exponents(scale: torch.Tensor) -> torch.Tensor:
    return torch.log2(scale / scale.amax(dim=1, keepdim=True))


def test_m1_scales_are_powers_of_two_rounded_up():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(7))
    free = QuantSpec(E2M1, PerGroup(32)).quantize(w).scale
    m1 = QuantSpec(E2M1, PerGroup(32), "m1").quantize(w).scale
    e = torch.log2(m1)
    assert torch.equal(e, torch.round(e))
    assert torch.all(m1 >= free) and torch.all(m1 < 2 * free)


def test_m2_one_real_scale_per_row_with_pow2_offsets():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(8))
    w[:, :32] *= 20  # spread of group ranges inside rows
    free = QuantSpec(E2M1, PerGroup(32)).quantize(w).scale
    m2 = QuantSpec(E2M1, PerGroup(32), "m2").quantize(w).scale
    k = -_row_pow2_exponents(m2)
    assert torch.equal(k, torch.round(k)) and k.min() >= 0 and k.max() <= MAX_POW2_SHIFT
    assert torch.equal(m2.amax(dim=1), free.amax(dim=1))  # the row scale stays real-valued
    assert torch.all(m2 >= free * (1 - 1e-6))


@pytest.mark.parametrize("constraint", ["m1", "m2"])
def test_fp4_codes_under_pow2_scales_cast_to_e4m3_exactly(constraint):
    """ZeroQuant-FP: FP4 weight × (power-of-two group factor) is an exact FP8 E4M3 number."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(9))
    w[:, 64:128] *= 0.05
    qt = QuantSpec(E2M1, PerGroup(32), constraint).quantize(w)
    fp4 = E2M1.decode(qt.codes)  # values in ±{0, .5, …, 6}
    shift = torch.exp2(_row_pow2_exponents(qt.scale))  # 2^−k per group, relative to the row's largest scale
    blocks = PerGroup(32).expand(shift.unsqueeze(-1), w.shape)
    fp8_operand = fp4 * blocks
    assert torch.equal(fp8_operand.to(torch.float8_e4m3fn).float(), fp8_operand)  # the cast is exact
    row = qt.scale.amax(dim=1, keepdim=True)
    assert torch.allclose(fp8_operand * row, qt.dequantize(), rtol=0, atol=0)


def test_unconstrained_fp4_scales_are_not_exact_in_fp8():
    """Control for the test above: without a constraint the same product generally needs rounding."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(9))
    qt = QuantSpec(E2M1, PerGroup(32)).quantize(w)
    rel = qt.scale / qt.scale.amax(dim=1, keepdim=True)
    operand = E2M1.decode(qt.codes) * PerGroup(32).expand(rel.unsqueeze(-1), w.shape)
    assert not torch.equal(operand.to(torch.float8_e4m3fn).float(), operand)


def test_fake_quant_straight_through_gradient():
    w = torch.randn(4, 64, requires_grad=True)
    spec = QuantSpec(IntFormat(4), PerGroup(16))
    with torch.no_grad():
        scale, zero = spec.qparams(w)
    spec.fake_quant(w, scale, zero).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # fixed qparams, within range: identity gradient
    x = torch.randn(4, 64, requires_grad=True)
    QuantSpec(E2M1, PerGroup(16)).fake_quant(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bad,match", [
    (lambda: IntFormat(1), "2–8 bits"),
    (lambda: IntFormat(9), "2–8 bits"),
    (lambda: PerGroup(0), "group size"),
    (lambda: make_format("int7x"), "unknown number format"),
    (lambda: make_format("int"), "bit width"),
    (lambda: make_format("fp4", bits=8), "4 bits"),
    (lambda: QuantSpec(IntFormat(4), PerGroup(32), "m1"), "FP weight formats"),
    (lambda: QuantSpec(IntFormat(4), PerGroup(32), "m2"), "FP weight formats"),
    (lambda: QuantSpec(E2M1, PerGroup(32), "m3"), "unknown scale constraint"),
    (lambda: FPFormat(0, 3), "unsupported FP format"),
    (lambda: QuantSpec(IntFormat(4), PerGroup(256)).validate_for(172, "mlp.down_proj"), "larger than the 172"),
])
def test_bad_arguments_raise_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_spec_json_round_trip():
    for spec in [QuantSpec(IntFormat(3, True), PerGroup(64)), QuantSpec(E2M1, PerGroup(32), "m2"),
                 QuantSpec(E5M2, PerToken()), QuantSpec(IntFormat(8), PerTensor())]:
        assert spec_from_dict(spec.to_dict()) == spec
    assert format_from_dict(E4M3.to_dict()) == E4M3
    assert make_format("fp8") == E4M3 and make_format("int", 4, True) == IntFormat(4, True)
