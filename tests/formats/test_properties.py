"""Property tests (hypothesis) over format × granularity × shape: no NaN, error within half a step, frozen codes
equal to fake quantization, pack/unpack round trip exact."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.formats import (
    E2M1, E2M3, E3M2, E4M3, E5M2, FPFormat, IntFormat, PerChannel, PerGroup, PerTensor, QuantSpec,
)
from bitsmith.nn.packed import pack_codes, unpack_codes

FORMATS = st.one_of(
    st.builds(IntFormat, st.integers(2, 8), st.booleans()),
    st.sampled_from([E4M3, E5M2, E3M2, E2M3, E2M1]),
)
GRANULARITIES = st.one_of(st.just(PerTensor()), st.just(PerChannel()), st.builds(PerGroup, st.integers(1, 70)))


@st.composite
def cases(draw):
    fmt = draw(FORMATS)
    gran = draw(GRANULARITIES)
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 100))
    seed = draw(st.integers(0, 2**16))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    if draw(st.booleans()):
        x[0, 0] = 0.0
    return fmt, gran, x


def _half_step(spec: QuantSpec, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = spec._blocks(x, scale)
    fmt = spec.format
    if isinstance(fmt, FPFormat):  # round-to-nearest-even: half the spacing of the binade of |x/s|
        v = (x / s).abs().clamp(min=2.0**fmt.emin)
        return s * torch.exp2(torch.floor(torch.log2(v)) - fmt.mbits) / 2
    return s / 2


@settings(max_examples=150, deadline=None)
@given(cases())
def test_quantize_invariants(case):
    fmt, gran, x = case
    spec = QuantSpec(fmt, gran)
    qt = spec.quantize(x)
    xq = qt.dequantize()
    assert torch.isfinite(xq).all()
    assert torch.equal(xq, spec.fake_quant(x))  # frozen codes reproduce the fake quantization exactly
    scale = qt.scale
    assert torch.all((xq - x).abs() <= _half_step(spec, x, scale) * (1 + 1e-5) + 1e-12)
    assert torch.equal(spec.quantize(xq, qt.scale, qt.zero).codes, qt.codes)  # on-grid values are fixed points


@settings(max_examples=150, deadline=None)
@given(cases())
def test_pack_unpack_round_trip(case):
    fmt, gran, x = case
    spec = QuantSpec(fmt, gran)
    qt = spec.quantize(x)
    packed = pack_codes(qt)
    assert torch.equal(unpack_codes(packed, spec, x.shape[-1]), qt.codes)
