"""QuantLinear and quantizers: SQNR floors, LWC gradients and limits, lifecycle transitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.nn import (
    ActQuantizer, QuantLinear, WeightQuantizer, fold_to_linear, freeze_all, quant_linears, set_quant_state, to_fake,
)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.detach(), approx.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.fixture
def linear_and_input():
    torch.manual_seed(0)
    return nn.Linear(256, 128), torch.randn(64, 256)


@pytest.mark.parametrize("fmt,gran,floor", [
    (IntFormat(8), PerChannel(), 45.0),
    (IntFormat(4), PerChannel(), 21.0),
    (IntFormat(4), PerGroup(64), 21.0),
    (IntFormat(3), PerChannel(), 15.0),
    (IntFormat(3), PerGroup(32), 15.0),
    (E4M3, PerChannel(), 30.0),
    (E2M1, PerGroup(32), 17.0),
], ids=str)
def test_fake_quant_linear_sqnr_floor(linear_and_input, fmt, gran, floor):
    lin, x = linear_and_input
    ref = lin(x)
    q = QuantLinear(lin, QuantSpec(fmt, gran))
    assert sqnr_db(ref, q(x)) > floor
    q.set_state("float")
    assert torch.equal(q(x), ref)  # float state is exactly the original layer


def test_sqnr_ordering_by_bits(linear_and_input):
    lin, x = linear_and_input
    ref = lin(x)
    vals = [sqnr_db(ref, QuantLinear(lin, QuantSpec(IntFormat(b)))(x)) for b in (2, 3, 4, 8)]
    assert vals == sorted(vals)


def test_lwc_gradients_reach_gamma_and_beta(linear_and_input):
    lin, x = linear_and_input
    q = QuantLinear(lin, QuantSpec(IntFormat(3), PerGroup(64)), lwc=True)
    assert q.weight_quantizer.gamma.shape == (128, 4, 1)
    loss = (q(x) - lin(x).detach()).pow(2).mean()
    loss.backward()
    for p in (q.weight_quantizer.gamma, q.weight_quantizer.beta):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_lwc_at_sigma_one_is_minmax_and_init_clips_slightly():
    w = torch.randn(32, 96)
    spec = QuantSpec(IntFormat(4), PerGroup(32))
    wq = WeightQuantizer(spec, tuple(w.shape), lwc=True, lwc_init=40.0)  # σ(40) == 1.0 in fp32
    assert torch.equal(wq(w), spec.fake_quant(w))
    init = WeightQuantizer(spec, tuple(w.shape), lwc=True)  # official init 4.0 → σ ≈ 0.982
    s_init, _ = init.qparams(w)
    s_mm, _ = spec.qparams(w)
    assert torch.allclose(s_init, s_mm * torch.sigmoid(torch.tensor(4.0)), rtol=1e-5)


def test_lwc_training_reduces_output_error(linear_and_input):
    lin, x = linear_and_input
    with torch.no_grad():  # heavy-tailed weights, as in trained LLMs: clipping the tails pays off
        lin.weight.copy_(torch.distributions.StudentT(3.0).sample(lin.weight.shape) * 0.02)
    q = QuantLinear(lin, QuantSpec(IntFormat(3), PerChannel()), lwc=True)
    target = lin(x).detach()
    before = float((q(x) - target).pow(2).mean().detach())
    opt = torch.optim.AdamW([q.weight_quantizer.gamma, q.weight_quantizer.beta], lr=5e-2, weight_decay=0)
    for _ in range(80):
        opt.zero_grad()
        loss = (q(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    assert float((q(x) - target).pow(2).mean().detach()) < 0.8 * before


def test_freeze_then_fold_reproduce_fake_output(linear_and_input):
    lin, x = linear_and_input
    block = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), lin)
    qs = to_fake(block, ["0", "2"], lambda n, l: (QuantSpec(IntFormat(4), PerGroup(64)), None))
    assert set(qs) == {"0", "2"} and all(isinstance(m, QuantLinear) for _, m in quant_linears(block))
    fake = block(x)
    freeze_all(block)
    assert all(m.state == "frozen" for _, m in quant_linears(block))
    assert torch.allclose(block(x), fake, atol=1e-6)
    codes = block[2].frozen.codes
    assert codes.dtype == torch.uint8 and codes.shape == (128, 256)
    set_quant_state(block, weight=False, act=False)
    assert not torch.allclose(block(x), fake, atol=1e-4)
    set_quant_state(block, weight=True, act=False)
    assert fold_to_linear(block) == 2
    assert type(block[2]) is nn.Linear
    assert torch.allclose(block(x), fake, atol=1e-6)


def test_activation_quantizer_per_token_and_static():
    x = torch.randn(2, 5, 64)
    x[0, 1] *= 50
    dyn = ActQuantizer(QuantSpec(IntFormat(8), PerToken()))
    err = (dyn(x) - x).abs().amax(-1)
    assert err[0, 0] < err[0, 1] / 10  # each token its own range
    static = ActQuantizer(QuantSpec(IntFormat(8), PerToken()), static=True)
    with pytest.raises(RuntimeError, match="observe"):
        static(x)
    static.observe(x)
    out = static(x)
    assert torch.unique(out).numel() <= 256  # one per-tensor grid
    dyn.enabled = False
    assert torch.equal(dyn(x), x)


def test_w_a_linear_quantizes_input(linear_and_input):
    lin, x = linear_and_input
    q = QuantLinear(lin, QuantSpec(IntFormat(8)), QuantSpec(IntFormat(4), PerToken()))
    wa = q(x)
    q.set_act_quant(False)
    w_only = q(x)
    assert not torch.allclose(wa, w_only) and sqnr_db(lin(x), wa) > 10


def test_group_larger_than_inputs_is_rejected():
    with pytest.raises(ValueError, match="larger than the 172 input features of down_proj"):
        to_fake(_mlp(), ["down_proj"],
                lambda n, l: (QuantSpec(IntFormat(4), PerGroup(256)), None))


def _mlp() -> nn.Module:
    m = nn.Module()
    m.down_proj = nn.Linear(172, 64)
    return m
