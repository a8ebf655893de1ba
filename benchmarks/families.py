"""Per-family quantization error: RTN vs GPTQ vs the default recipe on small random-weight models of every new
family, calibrated and evaluated on the fixture token ids (aidreams260K samples, vocab 512).

Random weights have no meaningful absolute perplexity (a random model is nearly uniform, and any perturbation may
lower its perplexity on real text), so the table reports the quantization error relative to fp32: the mean per-token
KL divergence ``KL(p_fp ‖ p_q)`` of the next-token distributions on the held-out test windows (×1000, nats), the
perplexity change ``ppl_q / ppl_fp − 1`` (%) for reference, and the seconds per block of each method. Usage (2 threads)::

    OMP_NUM_THREADS=2 python benchmarks/families.py [--wbits 3] [--group-size 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from tiny_models import tiny_model  # noqa: E402

from bitsmith.config import QuantConfig  # noqa: E402
from bitsmith.formats import IntFormat, PerGroup, QuantSpec  # noqa: E402
from bitsmith.models import get_architecture  # noqa: E402
from bitsmith.pipeline import quantize_model  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "aidreams260K-samples"
FAMILIES = ("llama", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3moe")
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
SHAPE_OVERRIDES = {"qwen3": {"head_dim": 16}, "gemma2": {"head_dim": 16}, "gemma3": {"head_dim": 16},
                   "mixtral": {"intermediate_size": 64}, "qwen3moe": {"head_dim": 16, "moe_intermediate_size": 64}}


def _ids(split: str) -> torch.Tensor:
    rows = [json.loads(line)["input_ids"] for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line]
    return torch.tensor([r[:128] for r in rows if len(r) >= 128])


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def _ppl(logp: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(float(-logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()))


def run(family: str, method: str, spec: QuantSpec, calib: torch.Tensor, test: torch.Tensor
        ) -> tuple[float, float, float]:
    kw = {**SHAPE, **SHAPE_OVERRIDES.get(family, {})}
    model = tiny_model(family, **kw)
    fp = _logprobs(model, test)
    cfg = QuantConfig(method=method, weight=spec, nsamples=calib.shape[0], seqlen=calib.shape[1])
    t0 = time.perf_counter()
    res = quantize_model(model, get_architecture(model), cfg, calib, torch.device("cpu"), progress=False)
    per_block = (time.perf_counter() - t0) / len(res.blocks)
    q = _logprobs(model, test)
    kl = float((fp.exp() * (fp - q)).sum(-1).mean())
    return 1000 * kl, 100 * (_ppl(q, test) / _ppl(fp, test) - 1), per_block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wbits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = QuantSpec(IntFormat(args.wbits), PerGroup(args.group_size))
    calib, test = _ids("valid")[: args.nsamples], _ids("test")[:32]
    print(f"threads {torch.get_num_threads()}, W{args.wbits} g{args.group_size}, {calib.shape[0]}×{calib.shape[1]} "
          f"calibration tokens, {test.shape[0]}×{test.shape[1]} test tokens")
    print("| family | KL×1e3 RTN | GPTQ | default | ΔPPL % RTN | GPTQ | default | s/block RTN | GPTQ | default |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in FAMILIES:
        cells = [run(family, m, spec, calib, test) for m in ("rtn", "gptq", "bitsmith")]
        print(f"| {family} | " + " | ".join(f"{c[i]:.{p}f}" for i, p in ((0, 2), (1, 2), (2, 2)) for c in cells)
              + " |", flush=True)


if __name__ == "__main__":
    main()
