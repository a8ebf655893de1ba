"""ZeroQuant-FP from the command line: the shipped zqfp recipes, LoRC end to end (fold for evaluation, factors in
the report), and every bad combination: one line, exit 2, nothing written, before calibration starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_path

from bitsmith.cli.main import main
from bitsmith.config import QuantConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# recipe → (weight format, weight group size, scale constraint, activation format, LoRC rank)
EXPECTED = {
    "zqfp-w8a8-int": ("uint8", None, "none", "uint8", 0),
    "zqfp-w8a8-fp8": ("e4m3", None, "none", "e4m3", 0),
    "zqfp-w4a8-int": ("uint4", 32, "none", "uint8", 0),
    "zqfp-w4a8-fp4": ("e2m1", 32, "none", "e4m3", 0),
    "zqfp-w4a8-fp4-m1": ("e2m1", 32, "m1", "e4m3", 0),
    "zqfp-w4a8-fp4-m2": ("e2m1", 32, "m2", "e4m3", 0),
}
EXPECTED.update({f"{k}-lorc8": (*v[:4], 8) for k, v in list(EXPECTED.items())})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zqfp_recipes(name):
    cfg = QuantConfig.load(RECIPES / f"{name}.json")
    wfmt, group, constraint, afmt, rank = EXPECTED[name]
    assert cfg.method == "gptq"
    assert cfg.weight.format.name == wfmt and getattr(cfg.weight.granularity, "group_size", None) == group
    assert cfg.weight.scale_constraint == constraint
    assert cfg.act.format.name == afmt and cfg.act.granularity.kind == "token"
    assert cfg.lorc_rank == rank and cfg.lorc_bits == (8 if rank else None)
    assert sorted(p.stem for p in RECIPES.glob("zqfp-*.json")) == sorted(EXPECTED)


def test_recipe_with_lorc_end_to_end(tmp_path):
    model, data = str(shared_path("models", "aidreams260K")), str(shared_path("data", "aidreams260K-samples"))
    out = tmp_path / "zq"
    rc = main(["quantize", model, "--recipe", str(RECIPES / "zqfp-w4a8-fp4-m2-lorc8.json"), "--calib", data,
               "--nsamples", "8", "--seqlen", "128", "--ppl", data, "--ppl-limit", "10", "-o", str(out), "-q"])
    assert rc == 0
    report = json.loads((out / "bitsmith.json").read_text())
    assert report["recipe"]["lorc_rank"] == 8 and report["recipe"]["lorc_bits"] == 8
    assert report["label"] == "W4(e2m1)A8(e4m3)g32+lorc8(int8)"
    layers = [s for b in report["blocks"] for s in b["layers"].values()]
    assert len(layers) == 28 and all(s["lorc_rel_err"] < s["weight_rel_err"] for s in layers)
    ev = tmp_path / "e.json"  # the saved weights are Ŵ + A·B; eval re-applies the FP8 activation quantization
    assert main(["eval", str(out), "--ppl", data, "--seqlen", "128", "--limit", "10", "--json", str(ev), "-q"]) == 0
    assert json.loads(ev.read_text())["ppl"][data] == pytest.approx(report["ppl"][data], rel=1e-6)
    # flags override the recipe: --lorc-rank 0 turns LoRC (and its factor bits) off
    off = tmp_path / "off"
    assert main(["quantize", model, "--recipe", str(RECIPES / "zqfp-w4a8-int-lorc8.json"), "--lorc-rank", "0",
                 "--calib", data, "--nsamples", "4", "--seqlen", "128", "-o", str(off), "-q"]) == 0
    recipe = json.loads((off / "bitsmith.json").read_text())["recipe"]
    assert recipe["lorc_rank"] == 0 and recipe["lorc_bits"] is None


def _bad(tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    rc = main([*argv, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("bitsmith: error: ") and match in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_bad_combinations(tmp_path, capsys, monkeypatch):
    import bitsmith.data

    def no_calibration(*a, **k):  # every check below must fire before calibration data is read
        raise AssertionError("calibration started")

    monkeypatch.setattr(bitsmith.data, "calibration_samples", no_calibration)
    model, data = str(shared_path("models", "aidreams260K")), str(shared_path("data", "aidreams260K-samples"))
    base = ["quantize", model, "--calib", data, "--nsamples", "4", "--seqlen", "128", "-q"]
    cases = [
        (["--wformat", "int", "--wbits", "4", "--scale-constraint", "m1"], "scale constraint m1 applies to FP weight"),
        (["--wformat", "int", "--wbits", "4", "--scale-constraint", "m2"], "scale constraint m2 applies to FP weight"),
        (["--recipe", str(RECIPES / "zqfp-w4a8-int.json"), "--scale-constraint", "m2"], "not uint4"),
        (["--wformat", "fp4", "--lorc-rank", "65"],
         "LoRC rank 65 is larger than min(out, in) = 64 of model.layers.0.self_attn.q_proj"),
        (["--wformat", "fp4", "--lorc-bits", "8"], "LoRC rank is 0"),
        (["--wformat", "fp4", "--lorc-rank", "8", "--lorc-bits", "9"], "lorc_bits must be 2–8"),
        (["--wformat", "fp4", "--lorc-rank", "-1"], "lorc_rank must be a non-negative integer"),
        (["--wbits", "16", "--abits", "8", "--lorc-rank", "8"], "needs quantized weights"),
    ]
    for extra, match in cases:
        _bad(tmp_path, capsys, [*base, *extra], match)
