"""LoRC (ZeroQuant-V2 low-rank compensation): the truncated SVD is optimal and monotone in the rank, the layer
computes with Ŵ + A·B, INT8 factors track fp factors, PackedLinear exports the factors bit-exactly, storage
accounting includes them, and the pipeline hook runs after every weight algorithm."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from bitsmith.algorithms.lorc import (
    FLOAT_FACTOR_BITS,
    LoRCFactors,
    apply_lorc,
    check_rank,
    factor_spec,
    fold,
    lorc_extra_bits,
    lorc_svd,
    make_factors,
)
from bitsmith.algorithms.omniquant import OmniQuantConfig
from bitsmith.algorithms.rtn import rtn_quantize
from bitsmith.config import QuantConfig
from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, PerToken, QuantizedTensor, QuantSpec
from bitsmith.models import get_architecture
from bitsmith.nn import PackedLinear, QuantLinear
from bitsmith.pipeline import quantize_model

OUT, IN = 40, 72  # ragged for g32: 72 = 2·32 + 8


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, IN, generator=g) * torch.exp(0.5 * torch.randn(1, IN, generator=g))


def _frozen_layer(spec: QuantSpec, seed: int = 0, bias: bool = True) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_weight(seed))
    q = QuantLinear(lin, spec)
    q.freeze()
    return q


def _fro(x: torch.Tensor) -> float:
    return float(x.pow(2).sum().sqrt())


@pytest.mark.parametrize("spec", [QuantSpec(IntFormat(3), PerGroup(32)), QuantSpec(E2M1, PerGroup(32), "m2")],
                         ids=["int3g32", "fp4g32m2"])
def test_error_shrinks_monotonically_with_rank_and_vanishes_at_full_rank(spec):
    w = _weight()
    w_hat = rtn_quantize(w, spec).dequantize()
    err = w - w_hat
    sigma = torch.linalg.svdvals(err)
    full = min(OUT, IN)
    residuals = []
    for r in range(full + 1):
        a, b = lorc_svd(err, r)
        assert a.shape == (OUT, r) and b.shape == (r, IN)
        res = _fro(w - (w_hat + a @ b))
        # Eckart–Young: the residual is exactly the energy of the dropped singular values
        assert res == pytest.approx(float(sigma[r:].pow(2).sum().sqrt()), rel=1e-3, abs=1e-4)
        residuals.append(res)
    assert all(x >= y - 1e-5 for x, y in zip(residuals, residuals[1:]))
    assert residuals[0] == pytest.approx(_fro(err), rel=1e-6)
    assert residuals[8] < 0.9 * residuals[0]
    assert residuals[-1] < 1e-4 * residuals[0]  # full rank: W recovered up to fp32 round-off


def test_factors_are_the_balanced_svd_split():
    err = _weight(3) - rtn_quantize(_weight(3), QuantSpec(IntFormat(2), PerChannel())).dequantize()
    a, b = lorc_svd(err, 6)
    s = torch.linalg.svdvals(err)[:6]
    # A = U_r Σ^½ and B = Σ^½ V_rᵀ: AᵀA = B Bᵀ = Σ_r
    assert torch.allclose(a.T @ a, torch.diag(s), atol=1e-4)
    assert torch.allclose(b @ b.T, torch.diag(s), atol=1e-4)


@pytest.mark.parametrize("bits", [None, 8])
def test_layer_computes_with_folded_weight_and_keeps_frozen_codes(bits):
    spec = QuantSpec(IntFormat(3), PerGroup(32))
    q = _frozen_layer(spec)
    codes = q.frozen.codes.clone()
    w_hat = q.frozen.dequantize()
    stats = apply_lorc(q, 8, bits)
    f = q.lorc
    assert isinstance(f, LoRCFactors) and f.rank == 8 and f.shape == (OUT, IN) and f.quantized == (bits is not None)
    assert torch.equal(q.frozen.codes, codes)  # the codes are untouched: LoRC is a separate branch
    a, b = f.values()
    folded = fold(q.frozen, f)
    assert torch.allclose(folded, w_hat + a @ b, atol=1e-6)
    assert not torch.allclose(folded, w_hat, atol=1e-3)
    x = torch.randn(5, IN)
    assert torch.equal(q(x), nn.functional.linear(x, folded, q.bias))
    assert torch.equal(q.to_linear().weight, folded)  # what finalize_block saves for evaluation
    w = q.weight.detach()
    rel_before = float((w - w_hat).pow(2).sum() / w.pow(2).sum())
    assert stats["lorc_rel_err"] == pytest.approx(float((w - folded).pow(2).sum() / w.pow(2).sum()), rel=1e-5)
    assert stats["lorc_rel_err"] < 0.9 * rel_before


def test_int8_factors_are_close_to_fp_factors():
    spec = QuantSpec(IntFormat(4), PerGroup(32))
    w = _weight(1)
    w_hat = rtn_quantize(w, spec).dequantize()
    fp = make_factors(w, w_hat, 8, None)
    i8 = make_factors(w, w_hat, 8, 8)
    assert fp.a.dtype == torch.float16 and fp.bits == FLOAT_FACTOR_BITS
    assert isinstance(i8.a, QuantizedTensor) and i8.a.codes.dtype == torch.int8 and i8.bits == 8
    assert i8.a.spec == factor_spec(8) and i8.a.scale.shape == (OUT, 1) and i8.b.scale.shape == (8, 1)
    d_fp, d_i8 = fp.delta(), i8.delta()
    assert _fro(d_i8 - d_fp) < 0.02 * _fro(d_fp)
    res_fp, res_i8 = _fro(w - w_hat - d_fp), _fro(w - w_hat - d_i8)
    assert res_i8 < 1.01 * res_fp and res_i8 < 0.95 * _fro(w - w_hat)
    i4 = make_factors(w, w_hat, 8, 4)  # the factor width is a parameter, not hard-coded
    assert i4.bits == 4 and _fro(d_i8 - d_fp) < _fro(i4.delta() - d_fp)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("spec", [QuantSpec(IntFormat(4), PerGroup(32)), QuantSpec(IntFormat(4, True), PerChannel()),
                                  QuantSpec(E2M1, PerGroup(32), "m1"), QuantSpec(E4M3, PerChannel())], ids=str)
def test_packed_linear_with_factors_matches_frozen_layer(spec, bits):
    q = _frozen_layer(spec)
    apply_lorc(q, 8, bits)
    packed = PackedLinear.from_frozen(q)
    a, b = packed.lorc_factors()
    if bits is None:
        assert torch.equal(a, q.lorc.a) and torch.equal(b, q.lorc.b)
    else:
        assert torch.equal(a.codes, q.lorc.a.codes) and torch.equal(b.codes, q.lorc.b.codes)
        assert torch.equal(a.scale, q.lorc.a.scale)
    x = torch.randn(3, 7, IN)
    assert torch.equal(packed(x), q(x))
    assert torch.equal(packed.effective_weight(), fold(q.frozen, q.lorc))
    state = packed.state_dict()  # exportable: the factors are buffers
    assert any(k.startswith("lorc_a") for k in state) and any(k.startswith("lorc_b") for k in state)


def test_storage_accounting_includes_factors():
    spec = QuantSpec(IntFormat(4), PerGroup(32))
    n = OUT * IN
    base = PackedLinear.from_frozen(_frozen_layer(spec)).storage_bits()
    for bits, factor_bits, scales in ((None, 16, 0), (8, 8, OUT + 8), (4, 4, OUT + 8)):
        q = _frozen_layer(spec)
        apply_lorc(q, 8, bits)
        packed = PackedLinear.from_frozen(q)
        extra = 8 * (IN + OUT) * factor_bits + scales * 16
        assert packed.storage_bits() == base + extra
        assert lorc_extra_bits(OUT, IN, 8, bits) == extra == q.lorc.storage_bits()
        # per weight: r·(in + out)·b / (in·out), plus the factors' row scales
        assert (packed.storage_bits() - base) / n == pytest.approx(8 * (IN + OUT) * factor_bits / n + scales * 16 / n)
    # a LLaMA-7B attention projection: rank 8, INT8 factors add 0.035 bits per weight (0.031 codes + 0.004 scales)
    assert lorc_extra_bits(4096, 4096, 8, 8) / 4096**2 == (8 * 8192 * 8 + (4096 + 8) * 16) / 4096**2
    assert lorc_extra_bits(4096, 4096, 8, 8) / 4096**2 == pytest.approx(0.0352, abs=1e-4)
    assert lorc_extra_bits(64, 64, 0, 8) == 0


def test_rank_limit_names_layer():
    with pytest.raises(ValueError, match=r"LoRC rank 65 is larger than min\(out, in\) = 64 of mlp.down_proj"):
        check_rank(65, 64, 172, "mlp.down_proj")
    check_rank(64, 64, 172, "ok")
    q = _frozen_layer(QuantSpec(IntFormat(4)))
    with pytest.raises(ValueError, match="= 40 of proj"):
        apply_lorc(q, 41, None, "proj")
    unfrozen = QuantLinear(nn.Linear(8, 8), QuantSpec(IntFormat(4)))
    with pytest.raises(ValueError, match="frozen"):
        apply_lorc(unfrozen, 2)


def _spec_w3():
    return QuantSpec(IntFormat(3), PerGroup(16))


@pytest.mark.parametrize("d,match", [
    ({"lorc_rank": -1}, "lorc_rank"),
    ({"lorc_rank": 8, "lorc_bits": 9}, "lorc_bits"),
    ({"lorc_rank": 8, "lorc_bits": 1}, "lorc_bits"),
    ({"lorc_rank": 0, "lorc_bits": 8}, "lorc-rank"),
    ({"lorc_rank": "8"}, "lorc_rank"),
    ({"lorc_rank": 8, "lorc_bits": 8.0}, "lorc_bits"),
])
def test_config_rejects_bad_lorc_settings(d, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict({"weight": _spec_w3().to_dict(), **d})


def test_config_lorc_needs_weight_quantization_and_round_trips():
    with pytest.raises(ValueError, match="weight"):
        QuantConfig(act=QuantSpec(IntFormat(8), PerToken()), lorc_rank=4)
    cfg = QuantConfig(method="gptq", weight=_spec_w3(), lorc_rank=8, lorc_bits=8)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["lorc_rank"] == 8 and cfg.to_dict()["lorc_bits"] == 8
    assert "lorc8" in cfg.label and "lorc" not in QuantConfig(weight=_spec_w3()).label


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["rtn", "gptq", "omniquant"])
def test_pipeline_hook_after_every_algorithm(method):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny_model("llama"), ids)
    errs = {}
    for rank, bits in ((0, None), (8, 8)):
        model = tiny_model("llama")
        cfg = QuantConfig(method=method, weight=_spec_w3(), nsamples=4, seqlen=16, lorc_rank=rank, lorc_bits=bits,
                          options=OmniQuantConfig(epochs=1) if method == "omniquant" else None)
        res = quantize_model(model, get_architecture(model), cfg, ids, torch.device("cpu"), progress=False)
        errs[rank] = float((_logits(model, ids) - ref).pow(2).mean())
        if rank == 0:
            assert res.lorc == {}
            continue
        assert set(res.lorc) == set(res.frozen) and len(res.frozen) == 14  # 7 linears × 2 blocks
        for name, qt in res.frozen.items():
            f = res.lorc[name]
            assert f.rank == 8 and f.quantized and f.a.codes.device.type == "cpu"
            # the saved (evaluation) weight is Ŵ + A·B; the frozen codes stay available for packed export
            assert torch.equal(model.get_submodule(name).weight.detach(), fold(qt, f))
        layers = [s for b in res.blocks for s in b["layers"].values()]
        assert all(s["lorc_rel_err"] < s["weight_rel_err"] for s in layers)
    assert errs[8] < errs[0]
