"""End-to-end norm tuning after the blocks: KL to the full-precision model, held-out selection, norms only."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from bitsmith.algorithms.e2e import EndToEndConfig, LogitsObjective, calibration_kl, chunked_kl, kl_loss, tune_end_to_end
from bitsmith.algorithms.default import BITSMITH
from bitsmith.algorithms.reconstruct import ReconstructConfig
from bitsmith.config import QuantConfig
from bitsmith.formats import IntFormat, PerChannel, QuantSpec
from bitsmith.models import get_architecture, norm_parameters
from bitsmith.pipeline import quantize_model

CPU = torch.device("cpu")


def _calib(n=8, t=16, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _teacher(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits, dim=-1)
    return lambda idx: logp[idx]


def _perturbed(model):
    """A crude stand-in for quantization: every block linear's weight plus noise."""
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.Linear) and m is not student.lm_head:
                m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
    return student


def test_kl_loss_matches_torch_kl_div_and_is_zero_for_equal_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    tl = torch.log_softmax(t, -1)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s, -1), tl, log_target=True, reduction="sum") / 10
    assert torch.allclose(kl_loss(s, tl), ref, atol=1e-6)
    assert float(kl_loss(t, tl)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_parameters_are_every_norm_of_the_model(family):
    model = tiny_model(family, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [names[id(p)] for p in norm_parameters(model)]
    expect = [n for n, p in model.named_parameters() if "norm" in n]
    assert sorted(got) == sorted(expect) and got


def test_tuning_norms_lowers_the_kl_to_the_full_precision_model():
    fp = tiny_model("llama", seed=2)
    student = _perturbed(fp)
    ids = _calib()
    teacher = _teacher(fp, ids)
    forward = lambda x: student(x).logits  # noqa: E731
    before = calibration_kl(forward, teacher, ids, list(range(8)), 4)
    weights = {n: p.detach().clone() for n, p in student.named_parameters() if "norm" not in n}
    info = tune_end_to_end(LogitsObjective(forward, teacher, ids), norm_parameters(student), 8,
                           EndToEndConfig(steps=30, lr=3e-2, batch=4))
    after = calibration_kl(forward, teacher, ids, list(range(8)), 4)
    assert info["kl_before"] == pytest.approx(before, rel=1e-5)
    assert info["kl_after"] == pytest.approx(after, rel=1e-5) and after < 0.8 * before
    assert all(torch.equal(weights[n], p) for n, p in student.named_parameters() if "norm" not in n)


def test_no_improvement_on_the_holdout_restores_the_initial_norms_exactly():
    fp = tiny_model("qwen2", seed=3)
    student = _perturbed(fp)
    ids = _calib(seed=4)
    params = norm_parameters(student)
    params[0].requires_grad_(False)
    flags, init = [p.requires_grad for p in params], [p.detach().clone() for p in params]
    # a learning rate far too high: every evaluation on the held-out sequences is worse than the start
    info = tune_end_to_end(LogitsObjective(lambda x: student(x).logits, _teacher(fp, ids), ids), params, 8,
                           EndToEndConfig(steps=10, lr=5.0, batch=2, holdout=2, eval_every=5))
    assert info["best_step"] == 0 and info["judged_on"] == "holdout" and info["steps"] == 10
    assert info["kl_after"] == info["kl_before"]
    assert all(torch.equal(p, q) for p, q in zip(params, init))
    assert [p.requires_grad for p in params] == flags  # as they were


def test_end_to_end_config_validation():
    with pytest.raises(ValueError, match="steps"):
        EndToEndConfig(steps=-1)
    with pytest.raises(ValueError, match="learning rate"):
        ReconstructConfig(e2e_steps=10, e2e_lr=0.0)
    assert ReconstructConfig().end_to_end() is None and BITSMITH.end_to_end() is not None
    with pytest.raises(ValueError, match="no calibration sequences to train on"):
        ids = _calib(n=2)
        tune_end_to_end(LogitsObjective(lambda x: x, lambda i: i, ids), [], 2, EndToEndConfig(holdout=2))


def test_pipeline_end_to_end_changes_only_norms_and_lowers_the_kl():
    base = tiny_model("llama", seed=5)
    ids = _calib(seed=6)
    common = dict(weight=QuantSpec(IntFormat(2), PerChannel()), nsamples=8, seqlen=16)
    runs = {}
    for steps in (0, 20):
        model = copy.deepcopy(base)
        rc = ReconstructConfig(steps=4, e2e_steps=steps, e2e_lr=3e-2)
        res = quantize_model(model, get_architecture(model), QuantConfig(method="bitsmith", options=rc,
                                                                         **common), ids, CPU, progress=False)
        runs[steps] = (model, res)
    (m0, r0), (m1, r1) = runs[0], runs[20]
    assert r0.end_to_end == {} and r1.end_to_end["steps"] == 20
    assert r1.end_to_end["kl_after"] < r1.end_to_end["kl_before"]
    for name in r0.frozen:  # the quantized weights are the block-wise result, untouched
        assert torch.equal(r0.frozen[name].codes, r1.frozen[name].codes)
        assert torch.equal(r0.frozen[name].scale, r1.frozen[name].scale)
    p0, p1 = dict(m0.named_parameters()), dict(m1.named_parameters())
    changed = {n for n in p0 if not torch.equal(p0[n], p1[n])}
    assert changed and all("norm" in n for n in changed)
    teacher = _teacher(base, ids)
    kl = [calibration_kl(lambda x, m=m: m(x).logits, teacher, ids, list(range(8)), 8) for m in (m0, m1)]
    assert kl[1] < kl[0] and kl[0] == pytest.approx(r1.end_to_end["kl_before"], rel=1e-4)


def test_nan_loss_stops_tuning_and_keeps_the_initial_norms():
    fp = tiny_model("llama", seed=11)
    student = _perturbed(fp)
    ids = _calib(seed=12)
    params = norm_parameters(student)
    init = [p.detach().clone() for p in params]
    calls = {"n": 0}

    def forward(x):  # finite for the initial evaluation, NaN from the first training step on
        calls["n"] += 1
        out = student(x).logits
        return out if calls["n"] <= 2 else out * float("nan")

    info = tune_end_to_end(LogitsObjective(forward, _teacher(fp, ids), ids), params, 8, EndToEndConfig(steps=5, batch=4))
    assert info["steps"] == 0 and info["best_step"] == 0 and info["kl_after"] == info["kl_before"]
    assert all(torch.equal(p, q) for p, q in zip(params, init))


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_chunked_kl_equals_the_full_kl_and_its_gradient(chunk):
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(6, 13, bias=False)
    z = torch.randn(2, 20, 6, generator=g, requires_grad=True)
    tz = torch.randn(2, 20, 6, generator=g)
    full = kl_loss(head(z), torch.log_softmax(head(tz), -1))
    full.backward()
    value, grad = chunked_kl(z, tz, head, chunk, grad=True)
    assert value == pytest.approx(float(full.detach()), rel=1e-5)
    assert torch.allclose(grad, z.grad, rtol=1e-4, atol=1e-7)
    assert chunked_kl(z, tz, head, chunk)[1] is None
