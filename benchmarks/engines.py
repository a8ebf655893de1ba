"""Each engine's perplexity on bitsmith's outputs against bitsmith's own, on the same token windows.

Engines run in their own venvs through the test clients (``tests/clients/``): vLLM's CPU build
(``../engines/vllm``) on a generated head_dim-64 Llama (vLLM's CPU attention refuses head_dim 16) and llama.cpp
(``../engines/llamacpp``, llama-cpp-python) on the aidreams260K fixture. Windows: 8 × 128 tokens of the stories260K
test samples (vLLM) and 20 × 128 of the aidreams260K test samples (llama.cpp). RTN, calibrated on the valid samples.
Usage (2 threads; each vLLM row starts an engine, about 2 minutes)::

    OMP_NUM_THREADS=2 python benchmarks/engines.py [--only vllm|llamacpp|kquant]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import engine_model  # noqa: E402

import bitsmith  # noqa: E402
from bitsmith.cli.main import main as cli  # noqa: E402
from bitsmith.data import eval_windows, load_tokens  # noqa: E402
from bitsmith.eval.perplexity import model_forward, perplexity  # noqa: E402
from bitsmith.models import load_model  # noqa: E402

SHARED = ROOT.parent / "shared"
ENGINES = ROOT.parent / "engines"
VLLM_ROWS = (  # label, quantize flags, export format or None (the output folder itself)
    ("fp32 model", None, None),
    ("W4 g32 output folder (packed/ inside)", ("--wbits", "4", "--group-size", "32"), None),
    ("W8A8 output folder (dense weights; no activation quantization)", ("--wbits", "8", "--sym", "--abits", "8"),
     None),
    ("W8A8 INT8 compressed-tensors export", ("--wbits", "8", "--sym", "--abits", "8"), "compressed-tensors"),
)
LLAMACPP_ROWS = (
    ("INT4 sym g32 → GGUF Q4_0", ("--wbits", "4", "--sym", "--group-size", "32")),
    ("INT8 sym g32 → GGUF Q8_0", ("--wbits", "8", "--sym", "--group-size", "32")),
    ("INT4 asym g32 → GGUF Q4_1", ("--wbits", "4", "--group-size", "32")),
)


def _quantize(src: Path, out: Path, calib: Path, flags, nsamples: int = 8) -> Path:
    assert cli(["quantize", str(src), "--method", "rtn", "--calib", str(calib), "--nsamples", str(nsamples),
                "--seqlen", "128", "-o", str(out), "-q", *flags]) == 0
    return out


def _ours(folder: Path, windows: torch.Tensor, act: bool) -> float:
    model = bitsmith.load(folder) if act else load_model(folder)[0]
    return perplexity(model_forward(model), windows, batch_size=1, device="cpu", progress=False)


def _client(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])


def vllm_rows(tmp: Path) -> list[tuple[str, float, float]]:
    windows = eval_windows(load_tokens(str(SHARED / "data/stories260K-samples/test.jsonl"), "test"), 128, 8)
    (tmp / "windows.json").write_text(json.dumps(windows.tolist()))
    fp = engine_model(tmp / "fp")
    rows = []
    for i, (label, flags, fmt) in enumerate(VLLM_ROWS):
        folder = fp if flags is None else _quantize(fp, tmp / f"v{i}", SHARED / "data/stories260K-samples/valid.jsonl",
                                                    flags)
        served = folder
        if fmt is not None:
            served = tmp / f"v{i}-ct"
            assert cli(["export", str(folder), "--format", fmt, "--output", str(served), "-q"]) == 0
        out = tmp / f"v{i}.json"
        _client([str(ENGINES / "vllm/bin/python"), str(ROOT / "tests/clients/vllm_logprobs.py"),
                 str(tmp / "windows.json"), str(served), str(out)])
        body = json.loads(out.read_text())
        theirs = math.exp(sum(body["nll"]) / sum(body["tokens"]))
        ours = _ours(folder, windows, act=fmt is not None) if flags else _ours(folder, windows, act=False)
        rows.append((f"vLLM CPU 0.32 · {label}", ours, theirs))
    return rows


def llamacpp_rows(tmp: Path) -> list[tuple[str, float, float]]:
    lines = (SHARED / "data/aidreams260K-samples/test.jsonl").read_text().splitlines()[:20]
    windows = torch.tensor([json.loads(line)["input_ids"][:128] for line in lines])
    (tmp / "lwindows.json").write_text(json.dumps(windows.tolist()))
    rows = []
    for i, (label, flags) in enumerate(LLAMACPP_ROWS):
        folder = _quantize(SHARED / "models/aidreams260K", tmp / f"l{i}", SHARED / "data/aidreams260K-samples",
                           flags)
        assert cli(["export", str(folder), "--format", "gguf", "--output", str(tmp / f"l{i}.gguf"), "-q"]) == 0
        out = tmp / f"l{i}.json"
        _client([str(ENGINES / "llamacpp/bin/python"), str(ROOT / "tests/clients/llamacpp_client.py"), "nll",
                 str(tmp / f"l{i}.gguf"), str(tmp / "lwindows.json"), str(out)])
        rows.append((f"llama.cpp (llama-cpp-python 0.3.36) · {label}", _ours(folder, windows, act=False),
                     math.exp(json.loads(out.read_text())["nll"])))
    return rows


KQUANT_SAMPLES = 128  # 16k calibration tokens: with 8 windows (1k tokens) learned rounding overfits (RESULTS)


def kquant_rows(tmp: Path) -> list[tuple[str, float]]:
    """KL(F32 ‖ Q4_K file) per position, all measured by llama.cpp on the hidden-256 generated model (every row a
    multiple of 256): bitsmith's RTN / GPTQ / default recipe on the q4_k grid against llama.cpp's own quantizer
    (all tensors Q4_K, embeddings and head F32, no importance matrix) of the same F32 file; calibration
    ``KQUANT_SAMPLES`` windows of 128 tokens."""
    import numpy as np

    windows = eval_windows(load_tokens(str(SHARED / "data/stories260K-samples/test.jsonl"), "test"), 128, 8)
    (tmp / "kwindows.json").write_text(json.dumps(windows.tolist()))
    fp = engine_model(tmp / "kfp", hidden=256, ffn=768)
    python, client = str(ENGINES / "llamacpp/bin/python"), str(ROOT / "tests/clients/llamacpp_client.py")
    assert cli(["export", str(fp), "--format", "gguf", "--output", str(tmp / "kfp.gguf"), "-q"]) == 0
    _client([python, client, "quantize", str(tmp / "kfp.gguf"), "Q4_K_S", str(tmp / "llamacpp.gguf")])
    files = {"llama.cpp's own quantizer (llama_model_quantize, pure Q4_K)": tmp / "llamacpp.gguf"}
    calib = SHARED / "data/stories260K-samples/valid.jsonl"
    for method in ("rtn", "gptq", "bitsmith"):
        src = _quantize(fp, tmp / f"k{method}", calib, ("--method", method, "--wformat", "q4_k"), KQUANT_SAMPLES)
        assert cli(["export", str(src), "--format", "gguf", "--output", str(src) + ".gguf", "-q"]) == 0
        files[f"bitsmith {method} on the q4_k grid"] = Path(str(src) + ".gguf")

    def logprobs(path: Path) -> torch.Tensor:
        _client([python, client, "logprobs", str(path), str(tmp / "kwindows.json"), str(path) + ".npy"])
        return torch.from_numpy(np.load(str(path) + ".npy")).double()

    ref = logprobs(tmp / "kfp.gguf")
    return [(label, float((ref.exp() * (ref - logprobs(path))).sum(-1).mean())) for label, path in files.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["vllm", "llamacpp", "kquant"], default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows, krows = [], []
        if args.only in (None, "kquant"):
            krows = kquant_rows(Path(tmp))
        if args.only in (None, "llamacpp"):
            rows += llamacpp_rows(Path(tmp))
        if args.only in (None, "vllm"):
            rows += vllm_rows(Path(tmp))
    print("| engine · output | bitsmith ppl | engine ppl | difference |\n|---|---|---|---|")
    for label, ours, theirs in rows:
        print(f"| {label} | {ours:.4f} | {theirs:.4f} | {100 * (theirs / ours - 1):+.3f} % |")
    if krows:
        print("\n| Q4_K file (hidden-256 generated model) | KL(F32 ‖ file) ×1e3, by llama.cpp |\n|---|---|")
        for label, kl in krows:
            print(f"| {label} | {1e3 * kl:.2f} |")


if __name__ == "__main__":
    main()
