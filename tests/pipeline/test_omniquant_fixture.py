"""OmniQuant orderings on the real aidreams260K fixture with small calibration budgets (16 × 128 tokens).

Measured (first 40 test windows; fp32 6.35): W2g32 RTN 14.05, GPTQ 11.21, OmniQuant (20 epochs, aug loss)
9.51; W4A4 SmoothQuant 7.15, OmniQuant (LWC+LET, 10 epochs) 7.00; W3g32 RTN 7.21, GPTQ 6.93, OmniQuant 6.93.
At W3g32 OmniQuant and GPTQ are within 0.2 % of each other on this fixture, so only OmniQuant < RTN is asserted
there (benchmarks/RESULTS.md has the full-size table).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path

from bitsmith.algorithms.omniquant import OmniQuantConfig
from bitsmith.config import QuantConfig
from bitsmith.formats import IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import get_architecture, load_model
from bitsmith.pipeline import quantize_model


def _ids(split: str, n: int) -> torch.Tensor:
    path = shared_path("data", "aidreams260K-samples", f"{split}.jsonl")
    return torch.tensor([json.loads(line)["input_ids"] for line in path.read_text().splitlines()[:n]])


def _ppl(method: str, weight: QuantSpec, act: QuantSpec | None = None, **omni) -> float:
    model, _ = load_model(shared_path("models", "aidreams260K"))
    cfg = QuantConfig(method=method, weight=weight, act=act, options=OmniQuantConfig(**omni) if method == "omniquant" else None,
                      nsamples=16,
                      seqlen=128)
    quantize_model(model, get_architecture(model), cfg, _ids("valid", 16), torch.device("cpu"), progress=False)
    test = _ids("test", 40)
    with torch.no_grad():
        logits = model(input_ids=test, use_cache=False).logits
    return float(torch.exp(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), test[:, 1:].flatten())))


def test_w2_group_omniquant_beats_gptq_and_rtn():
    w = QuantSpec(IntFormat(2), PerGroup(32))
    rtn, gptq = _ppl("rtn", w), _ppl("gptq", w)
    omni = _ppl("omniquant", w, epochs=20, aug_loss=True)  # the official W2 recipe adds aug_loss
    assert omni < 0.95 * gptq < 0.95 * rtn


def test_w4a4_omniquant_beats_smoothquant():
    w, a = QuantSpec(IntFormat(4), PerChannel()), QuantSpec(IntFormat(4), PerToken())
    sq = _ppl("smoothquant", w, a)
    omni = _ppl("omniquant", w, a, epochs=10, let=True)
    assert omni < 0.99 * sq


def test_w3_group_omniquant_beats_rtn():
    w = QuantSpec(IntFormat(3), PerGroup(32))
    assert _ppl("omniquant", w, epochs=10) < 0.98 * _ppl("rtn", w)
