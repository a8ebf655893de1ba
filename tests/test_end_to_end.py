"""The end-to-end stage's modes (end_to_end.py): checkpointed, offloaded and streamed tuning give the whole-model
result (same kept norms up to float rounding, same KL), on every family and on the real fixture, through the CLI;
the memory plan picks the mode up front and records its estimate."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, MOE_FAMILIES, random_ids, tiny_model

from bitsmith.algorithms.reconstruct import ReconstructConfig
from bitsmith.cli.main import main
from bitsmith.config import QuantConfig
from bitsmith.end_to_end import MODES, kl_chunk_tokens
from bitsmith.errors import ConfigError
from bitsmith.formats import IntFormat, PerChannel, PerGroup, QuantSpec
from bitsmith.models import get_architecture, norm_parameter_names
from bitsmith.pipeline import quantize_model
from bitsmith.utils.memory import end_to_end_need

CPU = torch.device("cpu")


def _norms(model) -> dict[str, torch.Tensor]:
    return {n: model.get_parameter(n).detach().clone() for n in norm_parameter_names(model)}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_and_offloaded_tuning_equal_whole_model_tuning(family):
    """Same kept norms and KL on every family (GQA, soft-capped logits, MoE, OPT's projections, tied heads)."""
    base = tiny_model(family, seed=5)
    ids = random_ids(8, 16, seed=6)
    # a kv spec too: the blocks are called with the KV-quantizing attention in every mode
    config = QuantConfig(method="bitsmith", options=ReconstructConfig(steps=2, e2e_steps=8, e2e_lr=3e-2, batch=4),
                         weight=QuantSpec(IntFormat(2), PerChannel()), nsamples=8, seqlen=16, batch_size=4,
                         kv=None if family in MOE_FAMILIES else QuantSpec(IntFormat(8), PerGroup(8)))
    runs = {}
    for mode in ("whole", "checkpointed", "offloaded"):
        model = copy.deepcopy(base)
        res = quantize_model(model, get_architecture(model), config, ids, CPU, progress=False, e2e_mode=mode)
        runs[mode] = (_norms(model), res.end_to_end)
    whole, info = runs["whole"]
    assert info["mode"] == "whole" and info["steps"] == 8 and info["kl_after"] < info["kl_before"]
    assert any(not torch.equal(v, _norms(base)[k]) for k, v in whole.items())  # tuning changed something
    for mode in ("checkpointed", "offloaded"):
        norms, other = runs[mode]
        assert other["mode"] == mode and other["steps"] == 8 and other["best_step"] == info["best_step"]
        assert other["kl_before"] == pytest.approx(info["kl_before"], rel=1e-5)
        assert other["kl_after"] == pytest.approx(info["kl_after"], rel=1e-4)
        _close(norms, whole)


def _quantize(model: str, calib: str, out, *flags: str) -> int:
    return main(["quantize", model, "-o", str(out), "--calib", calib, "--nsamples", "8", "--seqlen", "64",
                 "--wbits", "2", "--group-size", "32", "--steps", "4", "--e2e-steps", "10", "--batch-size", "4",
                 "--device", "cpu", "--threads", "1", "-q", *flags])


def test_streamed_and_checkpointed_tuning_equal_whole_model_tuning_on_the_fixture(tmp_path, aidreams, samples):
    """aidreams260K (tied head), default recipe: ``--stream`` now runs the stage (blocks read back from the
    checkpoint), and every mode writes the whole-model run's weights: the quantized weights bit for bit, the tuned
    norms up to float rounding."""
    outs = {}
    for mode, flags in {"whole": ("--no-stream", "--e2e-mode", "whole"),
                        "checkpointed": ("--no-stream", "--e2e-mode", "checkpointed"),
                        "streamed": ("--stream",)}.items():
        assert _quantize(aidreams, samples, tmp_path / mode, *flags) == 0
        outs[mode] = (load_file(str(tmp_path / mode / "model.safetensors")),
                      json.loads((tmp_path / mode / "bitsmith.json").read_text()))
    ref, report = outs["whole"]
    e2e = report["end_to_end"]
    assert e2e["mode"] == "whole" and e2e["kl_after"] < e2e["kl_before"] and "skipped" not in e2e
    norms = {k for k in ref if "norm" in k}
    assert norms and ref.keys() - norms
    for mode in ("checkpointed", "streamed"):
        got, rep = outs[mode]
        assert rep["end_to_end"]["mode"] == mode and rep["scale"]["end_to_end"]["mode"] == mode
        assert rep["end_to_end"]["kl_after"] == pytest.approx(e2e["kl_after"], rel=1e-4)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref.keys() - norms)
        _close({k: got[k] for k in norms}, {k: ref[k] for k in norms})
    assert not (tmp_path / "streamed.partial").exists()


def test_the_plan_picks_the_mode_up_front_and_refuses_what_cannot_fit(tmp_path, aidreams, samples, capsys):
    from bitsmith.models import geometry, load_model
    from bitsmith.plan import RunPlan
    from bitsmith.run import RunOptions

    assert _quantize(aidreams, samples, tmp_path / "auto") == 0
    plan = json.loads((tmp_path / "auto" / "bitsmith.json").read_text())["scale"]["end_to_end"]
    assert plan["mode"] == "whole" and plan["need_mb"] > 0  # the CPU has room for the fastest mode
    whole = plan["need_mb"]
    model, _ = load_model(aidreams)
    arch = get_architecture(model)
    config = QuantConfig(method="bitsmith", weight=QuantSpec(IntFormat(2), PerGroup(32)), nsamples=8, seqlen=64)
    plan = RunPlan(RunOptions(device="cpu"), CPU)
    geom = geometry(model.config, arch)
    plan._plan_end_to_end(config, model, arch, geom, 4, limit=None)
    whole = plan.plan["end_to_end"]["need_mb"] * 2**20
    plan.opts = RunOptions(device="cpu", e2e_mode="checkpointed")
    plan._plan_end_to_end(config, model, arch, geom, 4, limit=None)
    lean = plan.plan["end_to_end"]["need_mb"] * 2**20
    assert lean < whole
    plan.opts = RunOptions(device="cpu")  # a budget whole-model tuning does not fit: checkpointed, up front
    assert plan._plan_end_to_end(config, model, arch, geom, 4, limit=int((lean + whole) / 2)) == "checkpointed"
    with pytest.raises(Exception, match=r"end-to-end tuning needs ~.* --e2e-steps 0"):
        RunPlan(RunOptions(device="cpu"), CPU)._plan_end_to_end(config, model, arch, geometry(model.config, arch),
                                                                4, limit=2**20)
    assert _quantize(aidreams, samples, tmp_path / "bad", "--stream", "--e2e-mode", "whole") != 0
    assert "cannot run on a streamed model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_end_to_end_estimates_shrink_from_whole_to_streamed():
    kw = dict(model_bytes=16 * 2**30, block_bytes=2**29, ends_bytes=2**30, layers=32, hidden=4096,
              intermediate=14336, heads=32, vocab=128256, batch=8, seqlen=2048, units=128, elem=2,
              chunk=kl_chunk_tokens(128256), teacher_on_device=True)
    total = {m: sum(end_to_end_need(m, **kw).values()) for m in MODES}
    assert total["whole"] > total["checkpointed"] > total["offloaded"] == total["streamed"]
    # the full logits of one batch alone (8·2048·128256 fp32, 8.4 GB) are more than all of streamed's logits
    assert end_to_end_need("streamed", **kw)["KL chunk logits"] < 8 * 2048 * 128256 * 4
    assert kl_chunk_tokens(128256) * 128256 * 4 <= 256 * 2**20 and kl_chunk_tokens(10**9) == 16


def test_a_streamed_mode_without_a_checkpoint_is_refused_and_modes_are_validated():
    from bitsmith.end_to_end import run_end_to_end
    from bitsmith.algorithms.e2e import EndToEndConfig
    from bitsmith.run import RunOptions

    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="checkpoint"):
        run_end_to_end(model, get_architecture(model), random_ids(2, 8), [], CPU, EndToEndConfig(), "streamed")
    with pytest.raises(ConfigError, match="end-to-end mode"):
        run_end_to_end(model, get_architecture(model), random_ids(2, 8), [], CPU, EndToEndConfig(), "fast")
    with pytest.raises(ConfigError, match="end-to-end mode"):
        RunOptions(e2e_mode="fast")
