"""K-quant GGUF export: bitsmith's Q4_K/Q5_K/Q6_K codes in llama.cpp's super-block layout, read back by gguf's
dequantizer and run by llama.cpp (its own venv; skipped without it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import engine_python, shared_path

from bitsmith.cli.main import main
from bitsmith.formats import K_FORMATS, PerGroup, QuantSpec, make_format

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install -e '.[export]'")
from bitsmith.export.gguf import encode_blocks, gguf_type_for, rope_permutation  # noqa: E402

SHORT = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
CLIENT = Path(__file__).resolve().parents[1] / "clients" / "llamacpp_client.py"


@pytest.mark.parametrize("kind", K_FORMATS)
def test_super_blocks_dequantize_to_bitsmith_values(kind):
    fmt = make_format(kind)
    spec = QuantSpec(fmt, PerGroup(fmt.sub_block))
    w = torch.randn(8, 768, generator=torch.Generator().manual_seed(0)) * 0.05
    qt = spec.quantize(w)
    qtype = gguf_type_for("x", spec, 768, False)
    assert qtype.name == kind.upper()
    data = encode_blocks("x", qt, qtype)
    assert data.shape == (8, 3 * gguf.GGML_QUANT_SIZES[qtype][1])  # three super-blocks per row
    got = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())
    assert (got - qt.dequantize()).abs().max() <= 1e-6 * qt.dequantize().abs().max()


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    from tiny_models import engine_model

    return engine_model(tmp_path_factory.mktemp("kq") / "fp", hidden=256, ffn=768)


def _stories(split):
    return shared_path("data", "stories260K-samples", f"{split}.jsonl")


def _quantize(src, out, method, *flags):
    extra = ("--steps", "40", "--e2e-steps", "10") if method == "bitsmith" else ()
    assert main(["quantize", str(src), "--method", method, "--calib", str(_stories("valid")), "--nsamples", "8",
                 "--seqlen", "64", "-o", str(out), "-q", *extra, *flags]) == 0
    return out


def _read_back(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("kind", K_FORMATS)
def test_cli_k_quant_file_holds_bitsmith_weights(k_model, tmp_path, kind):
    import bitsmith

    src = _quantize(k_model, tmp_path / "q", "rtn", "--wformat", kind)
    assert main(["export", str(src), "--format", "gguf", "--output", str(tmp_path / "m.gguf"), "-q"]) == 0
    tensors = _read_back(tmp_path / "m.gguf")
    model = bitsmith.load(src)
    for i in range(2):
        for short, gname in SHORT.items():
            part = "self_attn" if gname.startswith("attn") else "mlp"
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == kind.upper(), gname
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            if short in ("q_proj", "k_proj"):
                got = got[torch.argsort(rope_permutation(got.shape[0], 4 if short == "q_proj" else 2))]
            want = model.get_submodule(f"model.layers.{i}.{part}.{short}").dequantized_weight()
            assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (i, short)


def test_q4_k_m_mix_in_the_file(k_model, tmp_path):
    """``--gguf-mix q4_k_m`` on 2 layers: llama.cpp's rule (use_more_bits(i, 2): only i = 1 ≥ 7·2/8) gives layer 1's
    attn_v and ffn_down Q6_K, everything else Q4_K; the file type is MOSTLY_Q4_K_M and the tensors still hold
    bitsmith's weights."""
    import bitsmith

    src = _quantize(k_model, tmp_path / "q", "gptq", "--wformat", "q4_k", "--gguf-mix", "q4_k_m")
    assert main(["export", str(src), "--format", "gguf", "--output", str(tmp_path / "m.gguf"), "-q"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
    for i in range(2):
        assert {types[f"blk.{i}.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} \
            == {"Q4_K"}
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = bitsmith.load(src).model.layers[1].mlp.down_proj.dequantized_weight()
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_ragged_rows_fall_back_like_llama_cpp(tmp_path, caplog):
    """The fixtures' 64-wide rows have no super-block: Q4_K falls back to Q5_0 (symmetric INT5, groups of 32),
    stated in the warning; the 172-wide down_proj (no 32-weight blocks either) stays dense."""
    model = shared_path("models", "aidreams260K")
    src = tmp_path / "q"
    with caplog.at_level("WARNING"):
        assert main(["quantize", str(model), "--method", "rtn", "--calib", str(shared_path("data",
                     "aidreams260K-samples")), "--nsamples", "2", "--seqlen", "32", "--wformat", "q4_k", "-o",
                     str(src), "-q"]) == 0
    assert "falls back to int5 group as llama.cpp's quantizer does" in caplog.text
    layers = json.loads((src / "packed" / "quantization.json").read_text())["layers"]
    assert {json.dumps(e["spec"]["format"]) for e in layers.values()} == {
        json.dumps({"type": "int", "bits": 5, "symmetric": True})}
    assert main(["export", str(src), "--format", "gguf", "--output", str(tmp_path / "m.gguf"), "-q"]) == 0
    types = {t.name.split(".")[2]: t.tensor_type.name for t in _read_back(tmp_path / "m.gguf").values()
             if t.name.startswith("blk.0.") and t.name.endswith(".weight") and "norm" not in t.name}
    assert types["attn_q"] == "Q5_0" and types["ffn_down"] == "F32"


# ---- llama.cpp -----------------------------------------------------------------------------------------------
def _client(*args):
    done = subprocess.run([engine_python("llamacpp", "BITSMITH_LLAMACPP_PYTHON"), str(CLIENT), *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _windows(tmp_path):
    from bitsmith.data import eval_windows, load_tokens

    w = eval_windows(load_tokens(str(_stories("test")), "test"), 128, 8)
    (tmp_path / "windows.json").write_text(json.dumps(w.tolist()))
    return w


def _logprobs(path, tmp_path):
    out = tmp_path / f"{Path(path).stem}.npy"
    _client("logprobs", path, tmp_path / "windows.json", out)
    return torch.from_numpy(np.load(out)).double()


def _kl(p_log, q_log):
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def test_gptq_optimises_the_k_grid(k_model, tmp_path):
    """GPTQ works on the grid the file stores (static super-block qparams): its block output error on the
    calibration data is well below RTN's on the same Q4_K grid."""
    mse = {}
    for method in ("rtn", "gptq"):
        src = _quantize(k_model, tmp_path / method, method, "--wformat", "q4_k")
        mse[method] = [b["output_mse"] for b in json.loads((src / "report.json").read_text())["blocks"]]
    assert all(g < 0.7 * r for g, r in zip(mse["gptq"], mse["rtn"])), mse


@pytest.mark.llamacpp
def test_llamacpp_runs_k_quant_files_with_bitsmith_perplexity(k_model, tmp_path):
    """llama.cpp's perplexity on bitsmith's Q4_K, Q6_K and Q4_K_M-mix (GPTQ) files is bitsmith's, within 0.5 %. Also measured
    (benchmarks/RESULTS.md): the files' KL to llama.cpp's own F32 run, against llama.cpp's own quantizer."""
    import bitsmith
    from bitsmith.eval.perplexity import model_forward, perplexity

    windows = _windows(tmp_path)
    targets = windows[:, 1:].unsqueeze(-1)
    for kind, mix in (("q4_k", ()), ("q6_k", ()), ("q4_k", ("--gguf-mix", "q4_k_m"))):
        src = _quantize(k_model, tmp_path / (kind + "".join(mix)), "gptq", "--wformat", kind, *mix)
        assert main(["export", str(src), "--format", "gguf", "--output", str(src) + ".gguf", "-q"]) == 0
        got = _logprobs(str(src) + ".gguf", tmp_path)
        engine_ppl = float(torch.exp(-got.gather(-1, targets).mean()))
        want = perplexity(model_forward(bitsmith.load(src)), windows, batch_size=1, device="cpu", progress=False)
        assert abs(engine_ppl / want - 1) < 5e-3, (kind, engine_ppl, want)


def test_ordinary_folder_is_written_unquantized(k_model, tmp_path, caplog):
    """A model folder without bitsmith.json becomes an F32 GGUF (the input of llama.cpp's own quantizer)."""
    from safetensors.torch import load_file

    with caplog.at_level("WARNING"):
        assert main(["export", str(k_model), "--format", "gguf", "--output", str(tmp_path / "fp.gguf"), "-q"]) == 0
    assert "not a bitsmith output folder: writing every tensor unquantized" in caplog.text
    tensors = _read_back(tmp_path / "fp.gguf")
    hf = load_file(str(Path(k_model) / "model.safetensors"))
    assert {t.tensor_type.name for t in tensors.values()} == {"F32"}
    got = torch.from_numpy(tensors["blk.1.ffn_down.weight"].data.copy())
    assert torch.equal(got, hf["model.layers.1.mlp.down_proj.weight"])
