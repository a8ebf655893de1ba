"""vLLM (its CPU build, in a venv of its own) serves bitsmith's outputs with bitsmith's perplexity.

Skipped unless a vLLM venv is found: ``$BITSMITH_VLLM_PYTHON``, else ``../engines/vllm/bin/python`` beside the
project (the README's "Deployment" section has the install commands). vLLM runs in a subprocess
(``tests/clients/vllm_logprobs.py``, public ``LLM`` API, prompt log-probabilities of token-id windows); each run
starts an engine (about 2 minutes here).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import engine_python, shared_path

from bitsmith.cli.main import main

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "vllm_logprobs.py"


def _vllm_python() -> str:
    return engine_python("vllm", "BITSMITH_VLLM_PYTHON")


def _vllm_ppl(python: str, folder: Path, windows: Path, tmp_path: Path) -> tuple[float, str | None]:
    out = tmp_path / f"{folder.name}.vllm.json"
    done = subprocess.run([python, str(CLIENT), str(windows), str(folder), str(out)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    body = json.loads(out.read_text())
    return math.exp(sum(body["nll"]) / sum(body["tokens"])), body["quantization"]


def _bitsmith_ppl(folder: Path, windows: torch.Tensor) -> float:
    import bitsmith
    from bitsmith.eval.perplexity import model_forward, perplexity

    return perplexity(model_forward(bitsmith.load(folder)), windows, batch_size=1, device="cpu", progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tiny_models import engine_model

    from bitsmith.data import eval_windows, load_tokens

    python = _vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    data = shared_path("data", "stories260K-samples")
    windows = eval_windows(load_tokens(str(data / "test.jsonl"), "test"), 128, 8)
    (root / "windows.json").write_text(json.dumps(windows.tolist()))
    return python, engine_model(root / "fp"), root, windows, data / "valid.jsonl"


def _quantize(src: Path, out: Path, calib: Path, *flags: str) -> Path:
    assert main(["quantize", str(src), "--method", "rtn", "--calib", str(calib), "--nsamples", "8", "--seqlen",
                 "128", "-o", str(out), "-q", *flags]) == 0
    return out


def test_vllm_loads_a_quantize_output_folder_as_it_is(setup, tmp_path):
    """The folder with its packed codes (packed/): vLLM reads only the model weights, the perplexity is bitsmith's."""
    python, fp, root, windows, calib = setup
    out = _quantize(fp, tmp_path / "w4", calib, "--wbits", "4", "--group-size", "32")
    assert (out / "packed" / "quantized.safetensors").is_file()
    got, quant = _vllm_ppl(python, out, root / "windows.json", tmp_path)
    want = _bitsmith_ppl(out, windows)
    assert quant is None and abs(got / want - 1) < 5e-3, (got, want)


def test_vllm_runs_the_w8a8_int8_export(setup, tmp_path):
    """INT8 weights × dynamic per-token INT8 activations: vLLM's CPU W8A8 kernel, within 0.5 % of bitsmith eval
    (which applies the same activation quantization)."""
    python, fp, root, windows, calib = setup
    out = _quantize(fp, tmp_path / "w8a8", calib, "--wbits", "8", "--sym", "--abits", "8")
    dest = tmp_path / "w8a8-ct"
    assert main(["export", str(out), "--format", "compressed-tensors", "--output", str(dest), "-q"]) == 0
    got, quant = _vllm_ppl(python, dest, root / "windows.json", tmp_path)
    want = _bitsmith_ppl(out, windows)
    assert quant == "compressed-tensors" and abs(got / want - 1) < 5e-3, (got, want)
