"""ZeroQuant-FP orderings on the real aidreams260K fixture, asserted only where they hold robustly.

Protocol: GPTQ, calibration on the first 32 windows of ``aidreams260K-samples/valid``, perplexity on the first 40
windows of ``test`` (seqlen 128), W4 groups of 32, per-token A8. Measured on five disjoint 32-window calibration
sets (first set in brackets; fp32 6.355):

* LoRC rank 8 (INT8 factors) lowers W4A8 perplexity every time: INT4/INT8 6.460 → 6.440 (gain 0.017–0.049),
  FP4-M2/FP8 6.622 → 6.549 (gain 0.03–0.07).
* M2 beats M1 every time (6.622 vs 6.633; margin 0.01–0.11), both ≈ 1 % above unconstrained FP4 (6.568).
* **Not as in the paper:** at W8A8, INT8 is slightly *better* than FP8 E4M3 every time (6.358 vs 6.397); FP8
  activations alone cost as much as FP8 weights alone (6.373 / 6.374). The paper's FP8 advantage comes from
  activation outliers of >1B-parameter models, which this 64-wide model does not have, so only "both W8A8 variants
  are near-lossless and within 1 % of each other" is asserted. Likewise INT4 beats FP4 at W4A8 here (6.460 vs
  6.568), which is not asserted either way.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path

from bitsmith.config import QuantConfig
from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import get_architecture, load_model
from bitsmith.pipeline import quantize_model

I8, F8 = QuantSpec(IntFormat(8), PerToken()), QuantSpec(E4M3, PerToken())
SETTINGS = {
    "w8a8-int": (QuantSpec(IntFormat(8), PerChannel()), I8, 0),
    "w8a8-fp8": (QuantSpec(E4M3, PerChannel()), F8, 0),
    "w4a8-int": (QuantSpec(IntFormat(4), PerGroup(32)), I8, 0),
    "w4a8-int-lorc8": (QuantSpec(IntFormat(4), PerGroup(32)), I8, 8),
    "w4a8-fp4-m1": (QuantSpec(E2M1, PerGroup(32), "m1"), F8, 0),
    "w4a8-fp4-m2": (QuantSpec(E2M1, PerGroup(32), "m2"), F8, 0),
    "w4a8-fp4-m2-lorc8": (QuantSpec(E2M1, PerGroup(32), "m2"), F8, 8),
}


def _ids(split: str, n: int) -> torch.Tensor:
    path = shared_path("data", "aidreams260K-samples", f"{split}.jsonl")
    return torch.tensor([json.loads(line)["input_ids"] for line in path.read_text().splitlines()[:n]])


def _ppl(model, ids) -> float:
    with torch.no_grad():
        lg = model(input_ids=ids, use_cache=False).logits
    return float(torch.exp(torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten())))


@pytest.fixture(scope="module")
def ppl() -> dict[str, float]:
    model_dir = shared_path("models", "aidreams260K")
    calib, test = _ids("valid", 32), _ids("test", 40)
    fp, _ = load_model(model_dir)
    out = {"fp32": _ppl(fp, test)}
    for key, (w, a, rank) in SETTINGS.items():
        model, _ = load_model(model_dir)
        cfg = QuantConfig(method="gptq", weight=w, act=a, nsamples=32, seqlen=128, lorc_rank=rank,
                          lorc_bits=8 if rank else None)
        quantize_model(model, get_architecture(model), cfg, calib, torch.device("cpu"), progress=False)
        out[key] = _ppl(model, test)
    return out


def test_lorc_lowers_w4a8_perplexity(ppl):
    assert ppl["w4a8-int-lorc8"] < ppl["w4a8-int"]
    assert ppl["w4a8-fp4-m2-lorc8"] < ppl["w4a8-fp4-m2"]
    assert ppl["fp32"] < ppl["w4a8-int-lorc8"]


def test_m2_no_worse_than_m1(ppl):
    assert ppl["w4a8-fp4-m2"] <= 1.005 * ppl["w4a8-fp4-m1"]
    assert ppl["w4a8-fp4-m1"] < 1.06 * ppl["fp32"]  # power-of-two scales cost little (measured +4.4 %)


def test_w8a8_int_and_fp8_are_near_lossless(ppl):
    for key in ("w8a8-int", "w8a8-fp8"):
        assert ppl[key] < 1.01 * ppl["fp32"], key
    assert abs(ppl["w8a8-fp8"] - ppl["w8a8-int"]) < 0.01 * ppl["w8a8-int"]
    assert ppl["w8a8-int"] < ppl["w4a8-int"] and ppl["w8a8-fp8"] < ppl["w4a8-fp4-m2"]
