"""QuantConfig: validation, labels, strict JSON round trip."""

from __future__ import annotations

import json

import pytest

from bitsmith.algorithms.gptq import GPTQConfig
from bitsmith.config import QuantConfig
from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, PerToken, QuantSpec

W4G128 = QuantSpec(IntFormat(4), PerGroup(128))


def test_round_trip_and_label(tmp_path):
    cfg = QuantConfig(method="gptq", weight=QuantSpec(E2M1, PerGroup(32), "m2"), act=QuantSpec(E4M3, PerToken()),
                      options=GPTQConfig(actorder=True), nsamples=16, seqlen=128)
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = tmp_path / "r.json"
    cfg.save(path)
    assert QuantConfig.load(path) == cfg
    assert cfg.label == "W4(e2m1)A8(e4m3)g32"
    assert QuantConfig(weight=W4G128).label == "W4A16g128"
    assert QuantConfig(weight=QuantSpec(IntFormat(3), PerChannel())).label == "W3A16"


@pytest.mark.parametrize("d,match", [
    ({"weight": W4G128.to_dict(), "bogus": 1}, "unknown recipe key"),
    ({"weight": W4G128.to_dict(), "nsamples": "8"}, "nsamples.*int"),
    ({"weight": W4G128.to_dict(), "method": "awq2"}, "unknown method"),
    ({"weight": W4G128.to_dict(), "version": 99}, "newer"),
    ({"weight": {"format": {"type": "int"}}}, "malformed"),
    ({"weight": W4G128.to_dict(), "gptq": {"damp": 1}}, "gptq"),
    ({"weight": W4G128.to_dict(), "method": "gptq", "options": {"damp": 1}}, "options"),
    ({"weight": W4G128.to_dict(), "method": "rtn", "options": {}}, "takes no options"),
    ({}, "nothing to quantize"),
    ({"weight": W4G128.to_dict(), "nsamples": 0}, "positive"),
    ({"weight": W4G128.to_dict(), "nsamples": 10, "batch_size": 4}, "multiple"),
])
def test_bad_recipes_rejected(d, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(d)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        QuantConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantConfig.load(bad)


def test_shipped_recipes_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.json"))
    assert len(files) >= 5
    for f in files:
        cfg = QuantConfig.load(f)
        assert (cfg.weight, cfg.act, cfg.kv) != (None, None, None) and QuantConfig.from_dict(cfg.to_dict()) == cfg
