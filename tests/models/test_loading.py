"""load_model: real checkpoints load as the walker expects; every folder mistake is one clear ModelError."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from tiny_models import tiny_config, tiny_model
from torch import nn

from bitsmith.models import ModelError, load_model, model_context_length, supported_architectures


def test_loads_real_model_with_tokenizer() -> None:
    model, tokenizer = load_model(shared_path("models", "aidreams260K"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.config.use_cache is False
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer is not None
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert ids.shape[0] == 1 and int(ids.max()) < model.config.vocab_size


def test_loads_real_model_without_tokenizer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bitsmith.models.loading"):
        model, tokenizer = load_model(shared_path("models", "stories260K"))
    assert tokenizer is None and "no tokenizer files" in caplog.text
    assert model.config.num_key_value_heads == 4


def test_dtype_choice(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype="float16")
    assert all(p.dtype == torch.float16 for p in model.parameters())
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ModelError, match="unknown dtype 'int8'"):
        load_model(tmp_path, dtype="int8")


def _folder(tmp_path: Path, config: dict | None = None, weights: bool = False) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        load_model(tmp_path / "model.safetensors")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(_folder(tmp_path))


def test_config_not_json(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not valid JSON"):
        load_model(folder)


@pytest.mark.parametrize("architectures", [["BertForMaskedLM"], None])
def test_unsupported_architecture(tmp_path: Path, architectures: list[str] | None) -> None:
    folder = _folder(tmp_path, {"architectures": architectures, "model_type": "bert"}, weights=True)
    with pytest.raises(ModelError, match="does not support") as info:
        load_model(folder)
    message = str(info.value)
    assert all(name in message for name in supported_architectures()) and "\n" not in message


def test_config_without_weights(tmp_path: Path) -> None:
    folder = _folder(tmp_path, tiny_config("llama").to_dict())
    with pytest.raises(ModelError, match=r"no weight files \(\*\.safetensors or \*\.bin\)"):
        load_model(folder)


def test_truncated_safetensors(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated") as info:
        load_model(tmp_path)
    assert str(weights) in str(info.value)


def test_garbage_safetensors(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ModelError, match="model.safetensors is corrupt or truncated"):
        load_model(tmp_path)


def _save_bin(model: nn.Module, folder: Path, state: object) -> None:
    model.config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")


def test_bin_weights_load(tmp_path: Path) -> None:
    model = tiny_model("opt")
    _save_bin(model, tmp_path, model.state_dict())
    loaded, _ = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo this must never run",))


def test_bin_pickles_are_loaded_weights_only(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model = tiny_model("llama")
    _save_bin(model, tmp_path, {**model.state_dict(), "payload": _Payload()})
    with pytest.raises(ModelError, match="pytorch_model.bin hold Python objects besides tensors"):
        load_model(tmp_path)
    assert "must never run" not in capfd.readouterr().out


def test_model_context_length() -> None:
    assert model_context_length(tiny_config("llama")) == 64
    assert model_context_length(type("Cfg", (), {"n_positions": 1024})()) == 1024
    with pytest.raises(ModelError, match="pass the sequence length"):
        model_context_length(type("Cfg", (), {})())
