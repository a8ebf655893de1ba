"""``bitsmith.quantize`` (run.py): the library form of ``bitsmith quantize`` writes the same output folder as the
CLI, defaults to the bitsmith recipe, and raises bitsmith's own errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import bitsmith
from bitsmith.cli.main import main
from bitsmith.errors import BitsmithError, ConfigError
from bitsmith.formats import IntFormat, PerGroup, QuantSpec



def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_library_run_writes_what_the_cli_writes(tmp_path, aidreams, samples):
    spec = QuantSpec(IntFormat(3), PerGroup(32))
    config = bitsmith.QuantConfig(method="gptq", weight=spec, calib=samples, nsamples=4, seqlen=64)
    report = bitsmith.quantize(aidreams, config, tmp_path / "lib", bitsmith.RunOptions(device="cpu", progress=False))
    assert main(["quantize", aidreams, "--method", "gptq", "--wbits", "3", "--group-size", "32", "--calib", samples,
                 "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "-o", str(tmp_path / "cli"), "-q"]) == 0
    lib, cli = _weights(tmp_path / "lib"), _weights(tmp_path / "cli")
    assert lib.keys() == cli.keys() and all(torch.equal(lib[k], cli[k]) for k in lib)
    assert (tmp_path / "lib" / "packed" / "quantized.safetensors").exists()  # packed by default, as the CLI
    written = json.loads((tmp_path / "lib" / "bitsmith.json").read_text())
    assert written["recipe"] == report["recipe"] == config.to_dict() and report["label"] == "W3A16g32"


def test_library_default_is_the_bitsmith_recipe_with_let_for_activations():
    w, a = QuantSpec(IntFormat(4), PerGroup(32)), QuantSpec(IntFormat(8), PerGroup(32))
    assert bitsmith.QuantConfig(weight=w).method == "bitsmith"
    assert bitsmith.QuantConfig(weight=w).options.let is False
    assert bitsmith.QuantConfig(weight=w, act=a).options.let is True


def test_library_errors_are_bitsmith_errors(tmp_path, aidreams, samples):
    config = bitsmith.QuantConfig(method="rtn", weight=QuantSpec(IntFormat(4), PerGroup(32)), calib=samples,
                                  nsamples=4, seqlen=4096)
    with pytest.raises(ConfigError, match="larger than the model's context"):
        bitsmith.quantize(aidreams, config, tmp_path / "o", bitsmith.RunOptions(device="cpu", progress=False))
    assert not (tmp_path / "o").exists()
    with pytest.raises(BitsmithError, match="does not exist|not a folder|config.json"):
        bitsmith.quantize(tmp_path / "missing", config, tmp_path / "o2", bitsmith.RunOptions(device="cpu"))
