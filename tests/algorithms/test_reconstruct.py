"""The block-reconstruction trainer and its parameter groups: rounding offsets, GPTQ start, best-iteration
restore, held-out early stopping, exact folds, samplers, optimisers, recipe configs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from bitsmith.algorithms.gptq import GPTQConfig, accumulate_hessian, gptq_solve
from bitsmith.algorithms.reconstruct.learnable import ClipGroup, LETGroup, RoundingGroup
from bitsmith.algorithms.autoround import AUTOROUND
from bitsmith.algorithms.default import BITSMITH
from bitsmith.algorithms.reconstruct import ReconstructConfig
from bitsmith.algorithms.reconstruct.trainer import ParamGroup, TrainConfig, _Sampler, train_block, train_with_retry
from bitsmith.config import QuantConfig
from bitsmith.formats import E2M1, IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import find_linears, get_architecture, get_blocks
from bitsmith.models.edges import let_edges
from bitsmith.nn import QuantLinear, freeze_all, quant_linears, set_quant_state, to_fake
from bitsmith.nn.quantizer import WeightQuantizer
from bitsmith.pipeline import quantize_model

SPECS = [QuantSpec(IntFormat(3), PerGroup(16)), QuantSpec(IntFormat(4, symmetric=True), PerChannel()),
         QuantSpec(E2M1, PerGroup(16))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.format.name)
def test_zero_rounding_offsets_reproduce_rtn_exactly(spec):
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    wq = WeightQuantizer(spec, tuple(w.shape))
    wq.enable_rounding()
    ref = spec.quantize(w)
    got = wq.freeze(w)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.scale, ref.scale)
    assert torch.equal(wq(w), spec.fake_quant(w))


def test_rounding_offsets_move_integer_and_fp_codes_by_grid_steps():
    spec = QuantSpec(IntFormat(4), PerChannel())
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    wq = WeightQuantizer(spec, tuple(w.shape))
    wq.enable_rounding()
    scale, zero = (t.reshape(4, 1) for t in spec.qparams(w))
    x = w / scale
    with torch.no_grad():
        wq.offset.fill_(0.45)
    expect = torch.clamp(torch.round(x + 0.45) + zero, 0, 15)
    assert torch.equal(wq.freeze(w).codes.float(), expect)
    # FP4 (E2M1): 2.6 lies between grid points 2 and 3 (local step 1): −0.45 steps rounds down to 2
    fp = QuantSpec(E2M1, PerChannel())
    v = torch.tensor([[2.6, 6.0]])  # absmax 6 → scale 1
    fq = WeightQuantizer(fp, (1, 2))
    fq.enable_rounding()
    assert fq(v)[0, 0] == 3.0
    with torch.no_grad():
        fq.offset.fill_(-0.45)
    assert fq(v)[0, 0] == 2.0


def test_gptq_start_with_zero_offsets_reproduces_gptq_codes():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(12, 48, generator=g), torch.randn(200, 48, generator=g) @ torch.randn(48, 48, generator=g)
    h, _ = accumulate_hessian(None, 0, x)
    for spec in (QuantSpec(IntFormat(3), PerGroup(16)), QuantSpec(IntFormat(2), PerChannel())):
        qt, _, latent = gptq_solve(w, h, spec, GPTQConfig())
        wq = WeightQuantizer(spec, tuple(w.shape))
        wq.set_start(latent, qt.scale, qt.zero)
        wq.enable_rounding()
        got = wq.freeze(w)
        assert torch.equal(got.codes, qt.codes)
        assert torch.equal(wq(w), qt.dequantize())


def test_pipeline_gptq_start_zero_steps_equals_gptq():
    model_a, model_b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    arch = get_architecture(model_a)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(IntFormat(3), PerGroup(16))
    common = dict(weight=spec, nsamples=4, seqlen=16)
    ra = quantize_model(model_a, arch, QuantConfig(method="gptq", **common), calib, torch.device("cpu"),
                        progress=False)
    rc = ReconstructConfig(start="gptq", clip="none", steps=0)
    rb = quantize_model(model_b, arch, QuantConfig(method="bitsmith", options=rc, **common), calib,
                        torch.device("cpu"), progress=False)
    assert ra.frozen.keys() == rb.frozen.keys()
    for name in ra.frozen:
        assert torch.equal(ra.frozen[name].codes, rb.frozen[name].codes), name


def _toy(lr=1e-2):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    q = QuantLinear(lin, QuantSpec(IntFormat(3)))
    group = RoundingGroup({"lin": q}, lr)
    x = [torch.randn(4, 16) for _ in range(4)]
    targets = [[lin(h).detach()] for h in x]
    return q, x, targets, group


def test_best_step_restore_returns_the_parameters_of_the_lowest_mini_batch_loss():
    q, x, targets, group = _toy(lr=0.3)
    seen = []

    def fwd(h, kw):
        seen.append(q.weight_quantizer.offset.detach().clone())
        return q(h)

    cfg = TrainConfig(steps=12, batch=2, sampling="random", optimizer="signsgd", best="step")
    info = train_block(fwd, [group], x, targets, [{}] * 4, cfg)
    losses = info["step_losses"]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert info["best_step"] == best
    assert torch.equal(q.weight_quantizer.offset, seen[2 * best])  # params that produced the best loss


def test_holdout_early_stop_and_best_by_holdout_loss():
    q, x, targets, group = _toy(lr=5.0)  # far too large: the held-out loss gets worse and training stops
    cfg = TrainConfig(steps=50, batch=1, optimizer="adamw", best="eval", eval_every=1, holdout=1, patience=3)
    info = train_block(lambda h, kw: q(h), [group], x, targets, [{}] * 4, cfg)
    assert info["steps_run"] < 50
    assert min(info["eval_losses"]) == info["eval_losses"][info["best_step"]]
    from bitsmith.algorithms.reconstruct.trainer import eval_loss
    assert eval_loss(lambda h, kw: q(h), x, targets, [{}] * 4, [3]) == pytest.approx(min(info["eval_losses"]))


def test_samplers():
    s = _Sampler(3, 2, random=False, seed=0)
    assert [s.next() for _ in range(3)] == [[0, 1], [2, 0], [1, 2]]
    r = _Sampler(5, 2, random=True, seed=0)
    cycle = r.next() + r.next()
    assert len(set(cycle)) == 4  # one reshuffled cycle never repeats a unit; its odd tail is dropped
    assert r.next() != [] and r.pos == 2


def test_signsgd_moves_each_parameter_by_lr_times_sign_and_projection_clamps():
    q, x, targets, group = _toy(lr=0.2)
    cfg = TrainConfig(steps=1, batch=4, optimizer="signsgd", schedule="constant")
    grads = {}
    p = q.weight_quantizer.offset
    p.register_hook(lambda g: grads.setdefault("g", g.clone()))
    train_block(lambda h, kw: q(h), [group], x, targets, [{}] * 4, cfg)
    assert torch.allclose(p, (-0.2 * torch.sign(grads["g"])).clamp(-0.5, 0.5))
    group.lr = 3.0
    train_block(lambda h, kw: q(h), [group], x, targets, [{}] * 4, cfg)
    assert p.abs().max() <= 0.5  # kept in [-0.5, 0.5]


def test_a_group_can_have_its_own_optimizer():
    """The default trains rounding/clipping with Adam and LET with signed steps: each group's optimizer."""
    q, x, targets, group = _toy(lr=0.2)
    extra = torch.nn.Parameter(torch.ones(16))
    other = ParamGroup("scale", [extra], lr=0.05, optimizer="signsgd")
    fwd = lambda h, kw: q(h * extra)  # noqa: E731
    grads = {}
    extra.register_hook(lambda g: grads.setdefault("g", g.clone()))
    p = q.weight_quantizer.offset
    p.register_hook(lambda g: grads.setdefault("o", g.clone()))
    cfg = TrainConfig(steps=1, batch=4, optimizer="adamw", schedule="constant")
    train_block(fwd, [group, other], x, targets, [{}] * 4, cfg)
    assert torch.allclose(extra, 1.0 - 0.05 * torch.sign(grads["g"]))  # signSGD step on this group
    moved = p[grads["o"].abs() > 1e-5].abs()  # Adam's first step: lr · g/(|g| + eps) ≈ ±lr, not a sign step of 0.05
    assert moved.numel() and torch.allclose(moved, torch.full_like(moved, 0.2), rtol=1e-3)


def test_token_normalised_loss_divides_each_token_by_its_target_rms():
    from bitsmith.algorithms.reconstruct.trainer import block_loss

    g = torch.Generator().manual_seed(3)
    t, o = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    rms = t.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.allclose(block_loss(o, t, "token_mse"), ((o - t) / rms).pow(2).mean())
    assert torch.allclose(block_loss(o, t), (o - t).pow(2).mean())
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0, 1e3]).reshape(1, 5, 1)  # per-token scales do not change it
    assert torch.allclose(block_loss(o * scale, t * scale, "token_mse"), block_loss(o, t, "token_mse"), rtol=1e-5)
    assert not torch.allclose(block_loss(o * scale, t * scale), block_loss(o, t))
    with pytest.raises(ValueError, match="unknown loss"):
        TrainConfig(loss="l1")


def test_nan_loss_in_signsgd_training_is_reported_with_block_name():
    q, x, targets, group = _toy()
    nan = lambda h, kw: q(h) * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="block 2: training diverged twice"):
        train_with_retry("block 2", nan, [group], x, targets, [{}] * 4, AUTOROUND.train(4))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_every_group_folds_exactly(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    arch = get_architecture(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    wspec, aspec = QuantSpec(IntFormat(3), PerGroup(16)), QuantSpec(IntFormat(8), PerToken())
    groups = []
    for block in get_blocks(model, arch):
        qlinears = to_fake(block, list(find_linears(block)), lambda n, l: (wspec, aspec))
        edges = let_edges(block, arch, model.config, shift=True, up_down=True)
        groups += [LETGroup(edges, {}, 0.5, 1e-3), ClipGroup(qlinears, 1e-3, "linear"), RoundingGroup(qlinears, 1e-3)]
    with torch.no_grad():
        for g in groups:
            for p in g.parameters():
                if isinstance(g, RoundingGroup):
                    p.uniform_(-0.5, 0.5)
                elif isinstance(g, ClipGroup):
                    p.uniform_(0.6, 1.0)
                else:
                    p.mul_(torch.empty_like(p).uniform_(0.7, 1.4))
    set_quant_state(model, weight=True, act=True)
    with torch.no_grad():
        reparam = model(input_ids=ids, use_cache=False).logits
        for g in groups:
            g.fold()
        freeze_all(model)
        folded = model(input_ids=ids, use_cache=False).logits
    assert all(q.state == "frozen" for _, q in quant_linears(model))
    assert torch.allclose(folded, reparam, atol=1e-5, rtol=1e-5)


def test_recipe_configs_and_json_round_trip():
    assert QuantConfig(method="autoround", weight=SPECS[0]).options == AUTOROUND
    assert QuantConfig(method="bitsmith", weight=SPECS[0]).options == BITSMITH
    c = QuantConfig(method="bitsmith", weight=SPECS[0], options=BITSMITH.replace(steps=50, holdout=2))
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="GPTQ start fixes the quantization grid"):
        ReconstructConfig(start="gptq", clip="linear")
    with pytest.raises(ValueError, match="epochs or steps"):
        ReconstructConfig(epochs=2, steps=10)
    with pytest.raises(ValueError, match="held-out"):
        ReconstructConfig(holdout=2, best="step")
    with pytest.raises(ValueError, match="takes GPTQConfig options"):
        QuantConfig(method="gptq", weight=SPECS[0], options=AUTOROUND)
    assert AUTOROUND.rates(32) == (1 / 200, 1 / 200)  # SignRound's lr rule
    assert (BITSMITH.optimizer, BITSMITH.let_optimizer, BITSMITH.loss) == ("adamw", "signsgd", "token_mse")
    assert BITSMITH.end_to_end().steps == 30 and AUTOROUND.end_to_end() is None
    with pytest.raises(ValueError, match="let_optimizer"):
        ReconstructConfig(let_optimizer="sgd")


def test_autoround_recipe_lowers_block_error_below_rtn():
    model_a, model_b = tiny_model("qwen2", seed=5), tiny_model("qwen2", seed=5)
    arch = get_architecture(model_a)
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(6))
    common = dict(weight=QuantSpec(IntFormat(2), PerChannel()), nsamples=8, seqlen=16)
    rtn = quantize_model(model_a, arch, QuantConfig(method="rtn", **common), calib, torch.device("cpu"),
                         progress=False)
    ar = quantize_model(model_b, arch, QuantConfig(method="autoround", options=AUTOROUND.replace(steps=16),
                                                   **common), calib, torch.device("cpu"), progress=False)
    assert ar.blocks[0]["output_mse"] < rtn.blocks[0]["output_mse"]
    assert ar.blocks[0]["loss_final"] <= ar.blocks[0]["loss_init"]


def test_mse_clip_search_picks_the_lowest_error_factor_per_block():
    from bitsmith.algorithms.reconstruct.learnable import search_clip

    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    w[0, 0] = 12.0  # an outlier: row 0 gains from clipping
    spec = QuantSpec(IntFormat(2), PerGroup(32))
    wq = WeightQuantizer(spec, tuple(w.shape))
    p = search_clip(wq, w)
    assert p.shape == (6, 2, 1) and p[0, 0] < 1.0

    def err(factor):
        s, z = spec.qparams(w, clip_min=factor, clip_max=factor)
        return spec.granularity.to_groups((spec.fake_quant(w, s, z) - w).abs().pow(2.4)).sum(-1, True)

    best = err(p)
    for f in torch.linspace(1.0, 0.4, 31):
        assert (best <= err(f) + 1e-6).all()


def test_block_report_losses_reuse_the_trainers_evaluations():
    """With best="eval" the block's reported initial/final losses come from the trainer's own evaluations: they
    equal an independent evaluation of the start (a zero-step run) and the lowest evaluated loss."""
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    common = dict(weight=QuantSpec(IntFormat(2), PerChannel()), nsamples=8, seqlen=16)
    stats = {}
    for steps in (0, 6):
        model = tiny_model("llama", seed=8)
        rc = BITSMITH.replace(steps=steps, eval_every=3, e2e_steps=0)
        res = quantize_model(model, get_architecture(model), QuantConfig(method="bitsmith", options=rc, **common),
                             calib, torch.device("cpu"), progress=False)
        stats[steps] = res.blocks[0]
    assert stats[6]["loss_init"] == pytest.approx(stats[0]["loss_init"], rel=1e-5)
    assert stats[6]["loss_final"] <= stats[6]["loss_init"]


@pytest.mark.parametrize("constraint", ["m1", "none"])
def test_clip_pow2_false_leaves_power_of_two_scales_unclipped(constraint):
    """``clip_pow2=False`` (the default recipe) trains no clipping on M1/M2-constrained layers: the same codes as
    a run without the clip group; unconstrained layers are clipped as before."""
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(9))
    spec = QuantSpec(E2M1, PerGroup(16), scale_constraint=constraint)
    common = dict(weight=spec, nsamples=4, seqlen=16)
    runs = {}
    for name, rc in {"default": BITSMITH.replace(steps=4, e2e_steps=0),
                     "noclip": BITSMITH.replace(steps=4, e2e_steps=0, clip="none"),
                     "clip": BITSMITH.replace(steps=4, e2e_steps=0, clip_pow2=True)}.items():
        model = tiny_model("llama", seed=10)
        runs[name] = quantize_model(model, get_architecture(model), QuantConfig(method="bitsmith", options=rc,
                                                                                **common),
                                    calib, torch.device("cpu"), progress=False).frozen
    same = lambda a, b: all(torch.equal(runs[a][n].codes, runs[b][n].codes) and  # noqa: E731
                            torch.equal(runs[a][n].scale, runs[b][n].scale) for n in runs[a])
    if constraint == "m1":
        assert same("default", "noclip")
    else:
        assert same("default", "clip") and not same("default", "noclip")
