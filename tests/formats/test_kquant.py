"""K-quant formats: the sub-block qparams lie on llama.cpp's 6/8-bit scale grid under fp16 super-block scales."""

from __future__ import annotations

import pytest
import torch

from bitsmith.formats import (K_FORMATS, IntFormat, KQuantFormat, PerChannel, PerGroup, QuantSpec, fallback_spec,
                              format_from_dict, make_format, spec_from_dict)
from bitsmith.formats.kquant import super_block_params


def _w(seed=0, shape=(16, 512)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)


@pytest.mark.parametrize("kind", K_FORMATS)
def test_qparams_are_on_the_super_block_grid(kind):
    fmt = make_format(kind)
    spec = QuantSpec(fmt, PerGroup(fmt.sub_block))
    qt = spec.quantize(_w())
    d, sc, dmin, m = super_block_params(fmt, qt.scale, qt.zero)
    assert torch.equal(d, d.half().float()) and d.shape == (16, 2)  # fp16 super-block scale
    assert int(sc.min()) >= 1 and int(sc.max()) == fmt.scale_levels  # the largest sub-block takes the top code
    per = 256 // fmt.sub_block
    torch.testing.assert_close(qt.scale, (d.repeat_interleave(per, 1) * sc), rtol=1e-6, atol=0)
    if fmt.has_min:
        assert int(m.min()) >= 0 and int(m.max()) <= 63
        torch.testing.assert_close(qt.zero * qt.scale, dmin.repeat_interleave(per, 1) * m, rtol=1e-5, atol=1e-9)
    else:
        assert torch.all(qt.zero == 32)
    assert int(qt.codes.max()) <= fmt.qmax
    # fake quantization is exactly the frozen codes' value, and the error is that of a real 4-6 bit grid
    fq = spec.fake_quant(_w())
    torch.testing.assert_close(fq, qt.dequantize(), rtol=0, atol=1e-6)
    rel = float((fq - _w()).pow(2).mean() / _w().pow(2).mean())
    assert rel < {4: 0.02, 5: 0.005, 6: 0.002}[fmt.bits]


def test_lwc_gradients_reach_the_clipping_strengths():
    fmt = KQuantFormat("q4_k")
    spec = QuantSpec(fmt, PerGroup(32))
    w = _w(1)
    gamma = torch.full((16, 16, 1), 0.9, requires_grad=True)
    scale, zero = spec.qparams(w, clip_max=gamma, clip_min=gamma)
    spec.fake_quant(w, scale, zero).sub(w).pow(2).sum().backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0


def test_spec_rules_and_serialisation():
    fmt = KQuantFormat("q6_k")
    assert format_from_dict(fmt.to_dict()) == fmt and make_format("q6_k", bits=6) == fmt
    spec = QuantSpec(fmt, PerGroup(16))
    assert spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="sub-blocks of 16"):
        QuantSpec(fmt, PerChannel())
    with pytest.raises(ValueError, match="unknown K-quant"):
        KQuantFormat("q7_k")
    with pytest.raises(ValueError, match="6-bit codes"):
        make_format("q6_k", bits=4)


@pytest.mark.parametrize("kind, want", [("q4_k", IntFormat(5, True)), ("q5_k", IntFormat(5, False)),
                                        ("q6_k", IntFormat(8, True))])
def test_rows_not_a_multiple_of_256_fall_back_like_llama_cpp(kind, want):
    fmt = make_format(kind)
    spec = QuantSpec(fmt, PerGroup(fmt.sub_block))
    assert fallback_spec(spec, 512) is spec
    assert fallback_spec(spec, 172) == QuantSpec(want, PerGroup(32))


def test_q4_k_m_gives_attn_v_and_ffn_down_q6_k_in_llama_cpp_s_layers():
    from bitsmith.formats import mix_spec

    base = QuantSpec(KQuantFormat("q4_k"), PerGroup(32))
    kinds = [mix_spec("q4_k_m", base, "ffn_down", i, 32).format.name for i in range(32)]
    # llama.cpp use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
    assert [i for i, k in enumerate(kinds) if k == "q6_k"] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                               30, 31]
    assert set(kinds) == {"q4_k", "q6_k"}
    assert mix_spec("q4_k_m", base, None, 0, 32) is base  # q, k, o, gate, up keep the base type
    assert mix_spec("q4_k_s", base, "attn_v", 3, 32).format.name == "q5_k"
    assert mix_spec("q4_k_s", base, "attn_v", 4, 32) == base
    assert mix_spec("q5_k_m", QuantSpec(KQuantFormat("q5_k"), PerGroup(32)), "attn_v", 0, 32).format.name == "q6_k"


def test_gguf_mix_needs_its_base_format():
    from bitsmith.config import QuantConfig

    with pytest.raises(ValueError, match="--wformat q4_k"):
        QuantConfig(weight=QuantSpec(IntFormat(4), PerGroup(32)), gguf_mix="q4_k_m")
    with pytest.raises(ValueError, match="unknown gguf_mix"):
        QuantConfig(weight=QuantSpec(KQuantFormat("q4_k"), PerGroup(32)), gguf_mix="q3_k_m")
    c = QuantConfig(weight=QuantSpec(KQuantFormat("q4_k"), PerGroup(32)), gguf_mix="q4_k_m")
    assert QuantConfig.from_dict(c.to_dict()) == c
