"""fit_codes: codes and scales recovered from on-grid weights reproduce them; off-grid weights are refused."""

from __future__ import annotations

import pytest
import torch

from bitsmith.formats import E2M1, E3M2, E4M3, IntFormat, PerChannel, PerGroup, PerTensor, QuantSpec
from bitsmith.formats.fit import fit_codes

FORMATS = [IntFormat(2), IntFormat(3, True), IntFormat(4), IntFormat(4, True), IntFormat(8), IntFormat(8, True),
           E4M3, E3M2, E2M1]
GRANS = [PerChannel(), PerGroup(32), PerGroup(48), PerTensor()]


def _weights(seed=0, shape=(24, 172)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("gran", GRANS, ids=lambda g: g.kind + str(getattr(g, "group_size", "")))
def test_fp32_on_grid_weights_give_back_the_codes(fmt, gran):
    spec = QuantSpec(fmt, gran)
    qt = spec.quantize(_weights())
    dense = qt.dequantize(torch.float32)
    got = fit_codes(dense, spec)
    assert torch.equal(got.codes, qt.codes)  # min-max scales: the original codes, bit for bit
    assert (got.dequantize() - dense).abs().max() <= 1e-6 * dense.abs().max()


@pytest.mark.parametrize("fmt", [IntFormat(4), IntFormat(4, True), E4M3], ids=lambda f: f.name)
def test_clipped_scales_and_unused_levels_still_fit(fmt):
    """LWC shrinks the range (codes saturate), GPTQ may leave levels unused: any fitting grid reproduces W."""
    w = _weights(1)
    spec = QuantSpec(fmt, PerGroup(32))
    scale, zero = spec.qparams(w, clip_min=torch.tensor(0.6), clip_max=torch.tensor(0.7))
    dense = spec.quantize(w, scale, zero).dequantize(torch.float32)
    dense[:, :16] = 0.0  # half a group of zeros: fewer distinct levels
    got = fit_codes(dense, spec)
    assert (got.dequantize() - dense).abs().max() <= 1e-6 * dense.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [IntFormat(4, True), IntFormat(3), E4M3, E2M1], ids=lambda f: f.name)
def test_16bit_folders_fit_within_the_dtype_rounding(fmt, dtype):
    spec = QuantSpec(fmt, PerChannel())
    dense = spec.quantize(_weights(2)).dequantize(torch.float32).to(dtype)
    got = fit_codes(dense, spec)
    err = (got.dequantize(torch.float32) - dense.float()).abs()
    assert (err <= 4 * torch.finfo(dtype).eps * dense.float().abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("fmt", [IntFormat(4), E4M3], ids=lambda f: f.name)
def test_off_grid_weights_are_refused(fmt):
    spec = QuantSpec(fmt, PerGroup(32))
    dense = spec.quantize(_weights(3)).dequantize(torch.float32)
    g = torch.Generator().manual_seed(4)
    lorc = torch.randn(24, 2, generator=g) @ torch.randn(2, 172, generator=g) * 1e-2  # a low-rank correction
    with pytest.raises(ValueError, match="not on the"):
        fit_codes(dense + lorc, spec)
