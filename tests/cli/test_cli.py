"""The command line end to end on the real fixtures, and every bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_path

from bitsmith.cli.main import main


def _reference_ppl(model_dir: str, jsonl: str, n: int) -> float:
    """Straightforward transformers computation, independent of bitsmith."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line)["input_ids"][:128] for line in open(jsonl)][:n]
    ids = torch.tensor(rows)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return float(torch.exp(nll))


def test_eval_fp32_matches_transformers_reference(aidreams, samples, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["eval", aidreams, "--ppl", samples, "--seqlen", "128", "--limit", "40", "--json", str(out),
                 "-q"]) == 0
    body = json.loads(out.read_text())
    assert set(body) == {"ppl", "seqlen", "model"} and body["seqlen"] == 128
    ppl = body["ppl"][samples]
    ref = _reference_ppl(aidreams, f"{samples}/test.jsonl", 40)
    assert abs(ppl - ref) / ref < 1e-3
    assert abs(ppl - 6.35) < 0.05  # FIXTURES.md


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_then_eval_round_trip(aidreams, samples, tmp_path, method):
    out = tmp_path / "q"
    rc = main(["quantize", aidreams, "--method", method, "--wbits", "4", "--group-size", "32", "--calib", samples,
               "--nsamples", "8", "--seqlen", "128", "--ppl", samples, "--ppl-limit", "20", "-o", str(out), "-q"])
    assert rc == 0
    report = json.loads((out / "bitsmith.json").read_text())
    assert report["recipe"]["method"] == method and report["label"] == "W4A16g32"
    assert len(report["blocks"]) == 4 and all(b["layers"] for b in report["blocks"])
    assert not list(tmp_path.glob(".q.tmp-*"))  # the temporary folder was renamed away
    ev = tmp_path / "e.json"
    assert main(["eval", str(out), "--ppl", samples, "--seqlen", "128", "--limit", "20", "--json", str(ev),
                 "-q"]) == 0
    assert json.loads(ev.read_text())["ppl"][samples] == pytest.approx(report["ppl"][samples], rel=1e-6)
    assert 6.0 < report["ppl"][samples] < 8.0


def test_weight_activation_output_reapplies_act_quant_on_eval(aidreams, samples, tmp_path):
    out = tmp_path / "wa"
    args = ["quantize", aidreams, "--method", "rtn", "--wbits", "8", "--abits", "4", "--calib", samples,
            "--nsamples", "4", "--seqlen", "128", "--ppl", samples, "--ppl-limit", "10", "-o", str(out), "-q"]
    assert main(args) == 0
    report = json.loads((out / "bitsmith.json").read_text())
    ev = tmp_path / "e.json"
    main(["eval", str(out), "--ppl", samples, "--seqlen", "128", "--limit", "10", "--json", str(ev), "-q"])
    assert json.loads(ev.read_text())["ppl"][samples] == pytest.approx(report["ppl"][samples], rel=1e-6)
    (out / "bitsmith.json").unlink()  # without the recipe the same folder is evaluated weight-only
    main(["eval", str(out), "--ppl", samples, "--seqlen", "128", "--limit", "10", "--json", str(ev), "-q"])
    assert json.loads(ev.read_text())["ppl"][samples] < report["ppl"][samples]


def test_kv_cache_only_quantization_round_trip(aidreams, samples, tmp_path):
    out = tmp_path / "kv"
    assert main(["quantize", aidreams, "--wbits", "16", "--kvbits", "4", "--calib", samples, "--nsamples", "4",
                 "--seqlen", "128", "--ppl", samples, "--ppl-limit", "10", "-o", str(out), "-q"]) == 0
    report = json.loads((out / "bitsmith.json").read_text())
    assert report["label"] == "W16A16KV4" and report["recipe"]["weight"] is None
    assert "bitsmith_kv" not in (out / "config.json").read_text()  # the saved model is a plain HF folder
    ev = tmp_path / "e.json"
    main(["eval", str(out), "--ppl", samples, "--seqlen", "128", "--limit", "10", "--json", str(ev), "-q"])
    ppl = json.loads(ev.read_text())["ppl"][samples]
    assert ppl == pytest.approx(report["ppl"][samples], rel=1e-6)
    assert 6.3 < ppl < 7.0  # fp32 6.35 on these windows: KV4 costs a little


def test_pretokenized_model_without_tokenizer(tmp_path):
    model = str(shared_path("models", "stories260K"))
    data = str(shared_path("data", "stories260K-samples"))
    out = tmp_path / "s"
    assert main(["quantize", model, "--method", "gptq", "--wbits", "8", "--calib", data, "--nsamples", "8",
                 "--seqlen", "128", "--ppl", data, "--ppl-limit", "10", "-o", str(out), "-q"]) == 0
    assert not (out / "tokenizer.json").exists()
    # fp32: 18.45 (FIXTURES.md); this tiny model is fragile (W4 per-channel RTN: 257), W8 is near-lossless
    assert json.loads((out / "bitsmith.json").read_text())["ppl"][data] < 1.05 * 18.45


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "bitsmith", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("bitsmith ")


def _bad(tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    rc = main([*argv, "-o", str(out)] if argv[0] == "quantize" else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [line for line in err if line.startswith("bitsmith: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and match in errors[0], err  # log warnings may precede
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_bad_inputs(tmp_path, capsys, aidreams, samples):
    base = ["--calib", samples, "--nsamples", "4", "--seqlen", "128", "-q"]
    no_cfg = tmp_path / "nocfg"
    no_cfg.mkdir()
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    cases = [
        (["quantize", str(tmp_path / "missing"), *base], "does not exist"),
        (["quantize", str(no_cfg), *base], "config.json"),
        (["quantize", str(alien), *base], "LlamaForCausalLM"),
        (["quantize", aidreams, "--group-size", "128", *base], "larger than the 64 input features"),
        (["quantize", aidreams, *base[:1], "nosuchset", *base[2:]], "nosuchset"),
        (["quantize", aidreams, "--calib", samples, "--seqlen", "256", "-q"], "context of 128"),
        (["quantize", aidreams, "--wbits", "9", *base], "2–8 bits"),
        (["quantize", aidreams, "--wbits", "1", *base], "2–8 bits"),
        (["quantize", aidreams, "--scale-constraint", "m1", *base], "FP weight formats"),
        (["quantize", aidreams, "--wformat", "int7x", *base], "unknown number format"),
        (["quantize", aidreams, "--group-size", "0", *base], "positive"),
        (["quantize", str(shared_path("models", "stories260K")), "--calib", "wikitext2", "--data-dir",
          str(shared_path("data")), "--nsamples", "4", "--seqlen", "128", "-q"], "tokenizer"),
        (["eval", aidreams, "--ppl", "nosuchset", "--seqlen", "128", "-q"], "nosuchset"),
        (["eval", aidreams, "--ppl", samples, "--seqlen", "4096", "-q"], "context of 128"),
        (["eval", aidreams, "--ppl", samples, "--seqlen", "128", "--threads", "0", "-q"], "--threads"),
    ]
    for argv, match in cases:
        _bad(tmp_path, capsys, argv, match)


def test_existing_output_refused_unless_overwrite(tmp_path, capsys, aidreams, samples):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["quantize", aidreams, "--method", "rtn", "--calib", samples, "--nsamples", "4", "--seqlen", "128",
            "-o", str(out), "-q"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "bitsmith.json").exists() and not (out / "keep.txt").exists()


def test_default_method_is_the_bitsmith_recipe_and_flags_override_it(tmp_path, aidreams, samples):
    out = tmp_path / "d"
    assert main(["quantize", aidreams, "--wbits", "3", "--calib", samples, "--nsamples", "4", "--seqlen", "64",
                 "--steps", "3", "--holdout", "1", "--e2e-steps", "4", "-o", str(out), "-q"]) == 0
    r = json.loads((out / "bitsmith.json").read_text())["recipe"]
    assert r["method"] == "bitsmith" and r["options"]["rounding"] and r["options"]["optimizer"] == "adamw"
    assert r["options"]["steps"] == 3 and r["options"]["holdout"] == 1 and r["options"]["best"] == "eval"
    assert r["options"]["e2e_steps"] == 4 and r["options"]["loss"] == "token_mse"
    e2e = json.loads((out / "report.json").read_text())["end_to_end"]
    assert e2e["steps"] == 4 and e2e["kl_after"] <= e2e["kl_before"]
    assert main(["quantize", aidreams, "--method", "autoround", "--start", "gptq", "--calib", samples,
                 "-o", str(tmp_path / "bad"), "-q"]) == 2 and not (tmp_path / "bad").exists()


def test_recipe_file_with_flag_override(tmp_path, aidreams, samples):
    out = tmp_path / "r"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "gptq-w4a16g128.json"
    assert main(["quantize", aidreams, "--recipe", str(recipe), "--group-size", "32", "--calib", samples,
                 "--nsamples", "4", "--seqlen", "64", "-o", str(out), "-q"]) == 0
    r = json.loads((out / "bitsmith.json").read_text())["recipe"]
    assert r["method"] == "gptq" and r["weight"]["granularity"] == {"kind": "group", "group_size": 32}
    assert r["nsamples"] == 4 and r["seqlen"] == 64


def test_bad_files_exit_2_with_one_line(tmp_path, capsys, aidreams, samples):
    """Issue 8's bad-file cases through the command line: one error line, exit 2, nothing written."""
    import shutil

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"foo": 1}\n')
    short = tmp_path / "short.jsonl"
    short.write_text('{"input_ids": [1, 2, 3]}\n')
    corrupt = tmp_path / "corrupt"
    shutil.copytree(aidreams, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    no_weights = tmp_path / "noweights"
    shutil.copytree(aidreams, no_weights)
    (no_weights / "model.safetensors").unlink()
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"method": "gptq", "wbitz": 4}')
    typed = tmp_path / "typed.json"
    typed.write_text('{"method": "gptq", "nsamples": "many"}')
    saved = tmp_path / "saved"
    shutil.copytree(aidreams, saved)
    (saved / "bitsmith.json").write_text("{broken")
    base = ["--nsamples", "4", "--seqlen", "128", "-q"]
    cases = [
        (["quantize", aidreams, "--recipe", str(recipe), "--calib", samples, "-q"], "unknown recipe key(s) wbitz"),
        (["quantize", aidreams, "--recipe", str(typed), "--calib", samples, "-q"], "nsamples"),
        (["eval", str(saved), "--ppl", samples, "--seqlen", "128", "-q"], "bitsmith.json is corrupt"),
        (["quantize", aidreams, "--calib", str(empty), *base], "empty"),
        (["quantize", aidreams, "--calib", str(binary), *base], "UTF-8"),
        (["quantize", aidreams, "--calib", str(notext), *base], "line 1"),
        (["quantize", aidreams, "--calib", str(short), *base], "not enough calibration tokens"),
        (["quantize", str(corrupt), "--calib", samples, *base], "model.safetensors"),
        (["quantize", str(no_weights), "--calib", samples, *base], "weight"),
    ]
    for argv, match in cases:
        _bad(tmp_path, capsys, argv, match)


@pytest.mark.parametrize("flags,let", [(["--abits", "4"], True), (["--aformat", "fp8"], True),
                                       (["--aformat", "e5m2"], True), (["--abits", "16"], False), ([], False)])
def test_default_recipe_learns_let_whenever_activations_are_quantized(flags, let):
    from bitsmith.cli.main import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["quantize", "MODEL", "-o", "OUT", *flags]))
    assert config.method == "bitsmith" and config.options.let is let
    assert (config.act is not None) is let
