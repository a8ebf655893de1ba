"""Default-recipe table: block-reconstruction recipes and ablations on the fixtures, official-runner protocol.

Run by hand (not by CI), from the project root, one row per process (so rows can run in parallel or be resumed)::

    OMP_NUM_THREADS=1 python benchmarks/recipes.py aidreams260K W3 autoround
    OMP_NUM_THREADS=1 python benchmarks/recipes.py aidreams260K W3 bitsmith '{"steps": 200}'   # an ablation

Protocol (as ``../shared/peers/omniquant-official/README.md`` §3, so numbers compare with the official code's):
calibration = the first 32 lines of ``<model>-samples/valid.jsonl`` (128 tokens each, file order, batch 1);
evaluation = the first 40 non-overlapping 128-token windows of the concatenated ``test.jsonl``; asymmetric INT
weights, per channel unless the setting says ``g32``; every linear of every block quantized (the 172-wide FFN
included). Methods: ``rtn``, ``gptq``, ``omniquant`` (JSON = ``OmniQuantConfig`` fields), ``autoround`` and
``bitsmith`` (JSON = changes to that method's ``ReconstructConfig`` preset). Prints one JSON line: perplexity,
quantization wall time (seconds, 1 torch thread), the best step per block.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from bitsmith.algorithms.omniquant import OmniQuantConfig
from bitsmith.algorithms import get_method
from bitsmith.config import QuantConfig
from bitsmith.eval.perplexity import model_forward, perplexity
from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import get_architecture, load_model
from bitsmith.pipeline import quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETTINGS = {  # name -> (weight spec, activation spec)
    "W2": (QuantSpec(IntFormat(2)), None), "W3": (QuantSpec(IntFormat(3)), None),
    "W4": (QuantSpec(IntFormat(4)), None),
    "W2g32": (QuantSpec(IntFormat(2), PerGroup(32)), None), "W3g32": (QuantSpec(IntFormat(3), PerGroup(32)), None),
    "W3g32sym": (QuantSpec(IntFormat(3, symmetric=True), PerGroup(32)), None),
    "W4A4": (QuantSpec(IntFormat(4), PerChannel()), QuantSpec(IntFormat(4), PerToken())),
    "W4A8fp": (QuantSpec(E2M1, PerGroup(32)), QuantSpec(E4M3, PerToken())),
    "W4A8m1": (QuantSpec(E2M1, PerGroup(32), scale_constraint="m1"), QuantSpec(E4M3, PerToken())),  # as peers.py
}


def _lines(path: Path, n: int) -> torch.Tensor:
    return torch.tensor([json.loads(line)["input_ids"][:128] for line in path.open()][:n])


def _windows(path: Path, n: int = 40) -> torch.Tensor:
    toks = [t for line in path.open() for t in json.loads(line)["input_ids"]]
    return torch.tensor(toks[: n * 128]).reshape(n, 128)


def config(setting: str, method: str, changes: dict) -> QuantConfig:
    weight, act = SETTINGS[setting]
    kw = dict(method=method, weight=weight, act=act, nsamples=32, seqlen=128)
    if method == "omniquant":
        kw["options"] = OmniQuantConfig(**changes)
    elif get_method(method).learned(get_method(method).default(act is not None)) is not None:
        kw["options"] = get_method(method).default(act is not None).replace(**changes)
    return QuantConfig(**kw)


def main(argv: list[str]) -> None:
    model_name, setting, method = argv[:3]
    changes = json.loads(argv[3]) if len(argv) > 3 else {}
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    model, _ = load_model(str(SHARED / "models" / model_name), "cpu", torch.float32)
    data = SHARED / "data" / f"{model_name}-samples"
    cfg = config(setting, method, changes)
    t0 = time.perf_counter()
    result = quantize_model(model, get_architecture(model), cfg, _lines(data / "valid.jsonl", 32),
                            torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - t0
    ppl = perplexity(model_forward(model), _windows(data / "test.jsonl"))
    print(json.dumps({"model": model_name, "setting": setting, "method": method, "changes": changes,
                      "ppl": round(float(ppl), 4), "seconds": round(seconds, 1),
                      "best_step": [b.get("best_step") for b in result.blocks],
                      "end_to_end": result.end_to_end}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
