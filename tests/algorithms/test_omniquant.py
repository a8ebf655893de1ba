"""OmniQuant pieces: exact folding of LET + LWC, NaN handling, config validation, LWC/LET training progress."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_model

from bitsmith.algorithms.omniquant import OmniQuantConfig
from bitsmith.algorithms.reconstruct.trainer import ParamGroup, TrainConfig, train_with_retry
from bitsmith.formats import IntFormat, PerGroup, PerToken, QuantSpec
from bitsmith.models import find_linears, get_architecture, get_blocks
from bitsmith.models.edges import let_edges
from bitsmith.nn import QuantLinear, freeze_all, quant_linears, set_quant_state, to_fake
from bitsmith.transforms import fold_edges


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "neox"])
def test_folded_model_equals_reparametrised(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    arch = get_architecture(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    wspec, aspec = QuantSpec(IntFormat(4), PerGroup(16)), QuantSpec(IntFormat(8), PerToken())
    edges = []
    for block in get_blocks(model, arch):
        to_fake(block, list(find_linears(block)), lambda n, l: (wspec, aspec), lwc=True)
        block_edges = let_edges(block, arch, model.config, shift=True, up_down=True)
        for e in block_edges:
            with torch.no_grad():
                e.scale.uniform_(0.5, 2.0)
                if e.shift is not None:
                    e.shift.normal_(0.0, 0.1)
            e.register()
        edges += block_edges
    for _, q in quant_linears(model):
        with torch.no_grad():
            q.weight_quantizer.gamma.normal_(3.0, 1.0)
            q.weight_quantizer.beta.normal_(3.0, 1.0)
    set_quant_state(model, weight=True, act=True)
    with torch.no_grad():
        reparam = model(input_ids=ids, use_cache=False).logits
        fold_edges(edges)
        freeze_all(model)
        folded = model(input_ids=ids, use_cache=False).logits
    assert all(q.state == "frozen" for _, q in quant_linears(model))
    assert torch.allclose(folded, reparam, atol=1e-5, rtol=1e-5)


def _toy_problem():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    q = QuantLinear(lin, QuantSpec(IntFormat(3)), lwc=True)
    x = [torch.randn(4, 16) for _ in range(3)]
    targets = [[lin(h).detach()] for h in x]
    group = ParamGroup("lwc", [q.weight_quantizer.gamma, q.weight_quantizer.beta], 1e-2)
    return q, x, targets, group


def test_nan_loss_retried_then_reported_with_block_name():
    q, x, targets, group = _toy_problem()
    calls = {"n": 0}

    def flaky(h, kw):
        calls["n"] += 1
        out = q(h)
        return out * float("nan") if calls["n"] == 1 else out

    info = train_with_retry("block 3", flaky, [group], x, targets, [{}] * 3, TrainConfig(steps=6))
    hist = info["step_losses"]
    assert len(hist) == 6 and all(torch.isfinite(torch.tensor(hist)))  # the retry succeeded
    always_nan = lambda h, kw: q(h) * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="block 3: training diverged twice"):
        train_with_retry("block 3", always_nan, [group], x, targets, [{}] * 3, TrainConfig(steps=3))


def test_retry_restores_initial_parameters(caplog):
    q, x, targets, group = _toy_problem()
    start = q.weight_quantizer.gamma.detach().clone()
    seen = []

    def record(h, kw):
        seen.append(q.weight_quantizer.gamma.detach().clone())
        out = q(h)
        return out * float("nan") if len(seen) == 3 else out  # fails after two updates

    with caplog.at_level(logging.WARNING):
        train_with_retry("block 0", record, [group], x, targets, [{}] * 3, TrainConfig(steps=3))
    assert "retrying" in caplog.text
    assert torch.equal(seen[3], start)  # the second attempt started from the saved initial values


def test_training_lowers_reconstruction_loss():
    q, x, targets, group = _toy_problem()
    info = train_with_retry("b", lambda h, kw: q(h), [group], x, targets, [{}] * 3, TrainConfig(steps=90))
    hist = info["step_losses"]
    assert sum(hist[-3:]) < sum(hist[:3])


@pytest.mark.parametrize("kw,match", [
    ({"lwc": False, "let": False, "epochs": 5}, "--lwc and/or --let"),
    ({"lwc_lr": 0.0}, "positive"),
    ({"alpha": 1.5}, "alpha"),
    ({"epochs": -1}, "non-negative"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        OmniQuantConfig(**kw)


def test_keep_best_restores_the_lowest_loss_parameters():
    from bitsmith.algorithms.reconstruct.trainer import eval_loss

    q, x, targets, group = _toy_problem()
    group.lr = 5.0  # far too large: the loss ends above its best value
    fwd = lambda h, kw: q(h)  # noqa: E731
    seen = []
    orig = eval_loss

    def spy(*a, **k):
        seen.append(orig(*a, **k))
        return seen[-1]

    import bitsmith.algorithms.reconstruct.trainer as rc

    rc.eval_loss, saved = spy, rc.eval_loss
    try:
        cfg = OmniQuantConfig(epochs=6, keep_best=True).to_reconstruct().train(3)
        train_with_retry("b", fwd, [group], x, targets, [{}] * 3, cfg)
    finally:
        rc.eval_loss = saved
    assert len(seen) == 7 and min(seen) < seen[-1]  # the last epoch was not the best one
    assert eval_loss(fwd, x, targets, [{}] * 3) == pytest.approx(min(seen), rel=1e-6)
