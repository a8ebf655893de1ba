"""Packed checkpoint (--pack): codes bit-exact, logits equal to the saved dequantized model, storage accounting."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path

import bitsmith
from bitsmith.cli.main import main
from bitsmith.export.packed import PACKED_CONFIG, PACKED_DIR, PACKED_NAME, read_packed_config
from bitsmith.formats.packing import packed_words
from bitsmith.models import load_model
from bitsmith.nn import PackedLinear


def _quantize(tmp_path, name, *flags):
    model = str(shared_path("models", "aidreams260K"))
    samples = str(shared_path("data", "aidreams260K-samples"))
    out = tmp_path / name
    rc = main(["quantize", model, "--method", "rtn", "--calib", samples, "--nsamples", "4", "--seqlen", "64",
               "--pack", "-o", str(out), "-q", *flags])
    assert rc == 0
    return out


def _ids():
    samples = shared_path("data", "aidreams260K-samples", "test.jsonl")
    rows = [json.loads(line)["input_ids"][:64] for line in open(samples)][:4]
    return torch.tensor(rows)


@pytest.mark.parametrize("flags", [
    ("--wbits", "4", "--group-size", "32"),
    ("--wbits", "3", "--group-size", "24", "--sym"),  # ragged groups and straddling 3-bit words
    ("--wformat", "fp4", "--group-size", "32", "--scale-constraint", "m2", "--lorc-rank", "4", "--lorc-bits", "8"),
])
def test_packed_load_matches_saved_model(tmp_path, flags, monkeypatch):
    captured = {}
    import bitsmith.export.packed as packed_mod

    real = packed_mod.save_packed

    def spy(model, frozen, lorc, folder):
        captured["frozen"] = frozen
        return real(model, frozen, lorc, folder)

    monkeypatch.setattr(packed_mod, "save_packed", spy)
    out = _quantize(tmp_path, "q", *flags)
    assert (out / PACKED_DIR / PACKED_NAME).is_file() and (out / PACKED_DIR / PACKED_CONFIG).is_file()
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # vLLM reads every one of these
    assert not list(out.glob(".*")) and not list(tmp_path.glob(".q.tmp-*"))  # written in the temp folder, renamed
    body = read_packed_config(out)
    frozen = captured["frozen"]
    assert set(body["layers"]) == set(frozen) and len(frozen) == 4 * 7

    packed_model = bitsmith.load(out)
    ref, _ = load_model(out)
    layers = {n: m for n, m in packed_model.named_modules() if isinstance(m, PackedLinear)}
    assert set(layers) == set(frozen)
    for name, p in layers.items():
        qt = p.unpack()
        assert torch.equal(qt.codes, frozen[name].codes), name  # bit-exact codes
        assert torch.equal(p.scale, frozen[name].scale.to(p.scale.dtype))
        entry = body["layers"][name]
        assert entry["spec"] == frozen[name].spec.to_dict() and entry["shape"] == [p.out_features, p.in_features]
        assert entry["storage_bits"] == p.storage_bits()
        # memory held = logical accounting + word padding (+ zeros stored as uint8, scales at their dtype)
        bits = p.spec.format.bits
        pad = (p.qweight.numel() * p.qweight.element_size() * 8) - p.out_features * p.in_features * bits
        if p.qweight.dtype == torch.int32:
            assert p.qweight.shape == (p.out_features, packed_words(p.in_features, bits))
            assert 0 <= pad < 32 * p.out_features
        else:
            assert 0 <= pad < 8 * p.out_features
        zero_extra = 0 if p.zero is None else p.zero.numel() * (8 - bits)
        scale_bits = p.scale.element_size() * 8
        lorc_extra = 0
        if hasattr(p, "lorc_specs"):
            lorc_extra = sum(b.numel() * b.element_size() * 8 for n, b in p.named_buffers() if n.startswith("lorc_")) \
                - p.lorc_storage_bits(scale_bits)
        assert p.buffer_nbytes() * 8 == p.storage_bits(scale_bits) + pad + zero_extra + lorc_extra
    ids = _ids()
    with torch.no_grad():
        got = packed_model(input_ids=ids, use_cache=False).logits
        want = ref(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5


def test_packed_load_reapplies_activation_quant(tmp_path):
    out = _quantize(tmp_path, "wa", "--wbits", "8", "--abits", "8")
    packed_model = bitsmith.load(out)
    ref, _ = load_model(out)
    from bitsmith.formats import spec_from_dict
    from bitsmith.models import get_architecture
    from bitsmith.pipeline import apply_activation_quant

    recipe = json.loads((out / "bitsmith.json").read_text())["recipe"]
    apply_activation_quant(ref, get_architecture(ref), spec_from_dict(recipe["act"]))
    plain, _ = load_model(out)
    ids = _ids()
    with torch.no_grad():
        got = packed_model(input_ids=ids, use_cache=False).logits
        want = ref(input_ids=ids, use_cache=False).logits
        weight_only = plain(input_ids=ids, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5
    assert (got - weight_only).abs().max() > 1e-4  # the activation quantizers are really there


def test_load_of_an_ordinary_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a bitsmith output folder"):
        bitsmith.load(tmp_path)
