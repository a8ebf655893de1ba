"""report.json / report.md / report.png beside bitsmith.json, and ``bitsmith compare`` over two real runs."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import shared_path

from bitsmith.cli.main import main
from bitsmith.eval import report as report_mod

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = str(shared_path("models", "aidreams260K"))
    samples = str(shared_path("data", "aidreams260K-samples"))
    root = tmp_path_factory.mktemp("runs")
    common = ["--calib", samples, "--nsamples", "4", "--seqlen", "128", "--ppl", samples, "--ppl-limit", "5",
              "--threads", "1", "-q"]
    outs = {}
    for name, flags in (("rtn-w4g32", ["--method", "rtn", "--wbits", "4", "--group-size", "32"]),
                        ("gptq-w3", ["--method", "gptq", "--wbits", "3"])):
        outs[name] = root / name
        assert main(["quantize", model, *flags, *common, "-o", str(outs[name])]) == 0
    return root, outs, samples


def _png_ok(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 1024


def test_report_json_fields_and_values(runs):
    _, outs, samples = runs
    out = outs["rtn-w4g32"]
    rep = json.loads((out / "report.json").read_text())
    base = json.loads((out / "bitsmith.json").read_text())
    assert {k: rep[k] for k in base} == base  # a superset of bitsmith.json
    assert rep["label"] == "W4A16g32" and rep["recipe"]["method"] == "rtn"
    assert rep["n_blocks"] == 4 and len(rep["blocks"]) == 4
    assert all(b["layers"] and "weight_rel_err" in next(iter(b["layers"].values())) for b in rep["blocks"])
    # W4 g32 asymmetric, fp16 scale + 4-bit zero per group: 4 + 16/32 + 4/32 for 64-wide inputs ...
    per_layer = rep["layer_bits_per_weight"]
    assert per_layer["model.layers.0.self_attn.q_proj"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    # ... while down_proj's 172 inputs make 6 groups per row (ragged last group counted whole)
    assert per_layer["model.layers.0.mlp.down_proj"] == pytest.approx(4 + 6 * 20 / 172)
    n_block = 4 * 64 * 64 + 2 * 172 * 64 + 64 * 172
    bits = 4 * (n_block * 4 + (4 * 64 * 2 + 2 * 172 * 2 + 64 * 6) * 20)
    assert rep["bits_per_weight"] == pytest.approx(bits / (4 * n_block))
    size = rep["size"]
    assert size["quantized_params"] == 4 * n_block and size["estimated_bytes"] < size["fp16_bytes"]
    assert rep["seconds"] > 0 and rep["total_seconds"] >= rep["seconds"] and rep["peak_memory_mb"] >= 0
    assert 5.0 < rep["ppl"][samples] < 10.0


def test_report_md_and_png(runs):
    _, outs, _ = runs
    for out in outs.values():
        md = (out / "report.md").read_text()
        assert "| block | output MSE | mean weight rel. err |" in md
        assert sum(line.startswith("| ") and line[2].isdigit() for line in md.splitlines()) == 4
        assert "bits per weight" in md
        assert _png_ok(out / "report.png")
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_compare_prints_runs_and_writes_png(runs, capsys):
    root, outs, samples = runs
    png = root / "cmp" / "compare.png"
    assert main(["compare", *map(str, outs.values()), "--output", str(png), "--dataset", "aidreams260K-samples",
                 "-q"]) == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "label", "method", "bits/w"]
    assert any("rtn-w4g32" in ln and "W4A16g32" in ln and "4.641" in ln for ln in lines)
    assert any("gptq-w3" in ln and "W3A16" in ln and "gptq" in ln for ln in lines)
    assert _png_ok(png)


def test_compare_folder_without_report_exits_2(runs, tmp_path, capsys):
    _, outs, _ = runs
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["compare", str(outs["rtn-w4g32"]), str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitsmith: error:") and "no report.json" in err[0]
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert main(["compare", str(outs["rtn-w4g32"]), "--dataset", "nope"]) == 2


def test_without_matplotlib_png_is_skipped_with_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(report_mod, "_pyplot", lambda: None)
    body = {"label": "W4A16", "recipe": {"method": "rtn"},
            "blocks": [{"block": 0, "output_mse": 1e-3, "layers": {"a": {"weight_rel_err": 0.1}}, "seconds": 0.1}]}
    with caplog.at_level(logging.WARNING, logger="bitsmith"):
        report_mod.write_reports(tmp_path, body)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
    assert not (tmp_path / "report.png").exists()
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="matplotlib"):
        report_mod.compare([], output=tmp_path / "c.png")


def test_compare_plot_uses_log_y_only_above_10x(tmp_path):
    plt = report_mod._pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")

    def run(bpw, ppl, label):
        return {"run": label, "label": label, "recipe": {"method": "rtn"}, "bits_per_weight": bpw,
                "ppl": {"wikitext2": ppl}}

    wide = [run(16.0, 5.5, "W16A16"), run(4.6, 6.1, "W4A16g32"), run(2.2, 480.0, "W2A16")]
    assert report_mod.plot_compare(wide, "wikitext2", tmp_path / "log.png", plt) == (3, "log")
    narrow = [run(4.6, 6.1, "W4A16g32"), run(3.2, 7.9, "W3A16")]
    assert report_mod.plot_compare(narrow, "wikitext2", tmp_path / "lin.png", plt) == (2, "linear")
    assert _png_ok(tmp_path / "log.png") and _png_ok(tmp_path / "lin.png")
    table = report_mod.compare_table(wide)
    assert "W2A16" in table and "480.0000" in table and table.count("\n") == 3
