"""The streaming safetensors writer (export/shards.py): files it writes read back exactly with safetensors' own
reader, shards split at the size limit with Hugging Face's names and index, random checkpoints load in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bitsmith.export.shards import INDEX_NAME, SafetensorsStream, ShardWriter, write_random_model


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(7, generator=g).half(),  # odd byte count: later offsets are not 4-aligned
        "c.bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "d.i8": torch.randint(-128, 127, (5,), generator=g, dtype=torch.int8),
        "e.u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(3.5),
        "h.empty": torch.zeros(0, 4),
        "i.i64": torch.arange(6).reshape(2, 3),
        "j.fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "k.view": torch.randn(4, 6, generator=g).t(),  # non-contiguous
    }


def test_stream_round_trips_every_dtype_exactly(tmp_path):
    tensors = _mixed()
    stream = SafetensorsStream(tmp_path / "x.safetensors", {"extra": "1"})
    for name, t in tensors.items():
        stream.add(name, t)
    stream.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else back[name],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "extra": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # the data file is gone


def test_stream_refuses_a_duplicate_name(tmp_path):
    stream = SafetensorsStream(tmp_path / "x.safetensors")
    stream.add("w", torch.zeros(2))
    with pytest.raises(ValueError, match="already written"):
        stream.add("w", torch.zeros(2))
    stream.abort()
    assert not any(tmp_path.iterdir())


def test_writer_splits_at_the_limit_with_hf_names_and_index(tmp_path):
    writer = ShardWriter(tmp_path / "stage", max_shard_bytes=1000)
    tensors = {f"layer.{i}.w": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    tensors["big"] = torch.ones(50, 10)  # 2000 bytes: above the limit, a shard of its own
    for name, t in tensors.items():
        writer.add({name: t})
    out = tmp_path / "out"
    out.mkdir()
    paths = writer.finish_into(out)
    assert [p.name for p in paths] == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    groups = [["layer.0.w", "layer.1.w"], ["layer.2.w", "layer.3.w"], ["layer.4.w"], ["big"]]
    for i, names in enumerate(groups):  # filled in order, a new shard when the next tensor would pass 1000 bytes
        shard = load_file(str(paths[i]))
        assert sorted(shard) == names
        assert all(torch.equal(shard[n], tensors[n]) for n in names)
    assert not (tmp_path / "stage").exists()


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    writer = ShardWriter(tmp_path / "stage")
    writer.add({"w": torch.ones(3)})
    writer.finish_into(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / INDEX_NAME).exists()


def test_writer_discards_a_killed_runs_leftovers(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "shard-00000.safetensors.data").write_bytes(b"junk")
    writer = ShardWriter(stage)
    writer.add({"w": torch.ones(2)})
    assert sorted(p.name for p in stage.iterdir()) == ["shard-00000.safetensors.data"]
    writer.abort()
    assert not stage.exists()


def test_random_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    write_random_model(cfg, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / INDEX_NAME).is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as save_pretrained does
    assert model.lm_head.weight is model.model.embed_tokens.weight
    norm = model.model.layers[0].input_layernorm.weight.detach()
    assert 0.5 < float(norm.mean()) < 1.5 and float(norm.std()) > 0.01  # norms around 1, randomised
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
