"""The generic block walker reproduces each family's own forward, block by block.

Exactness: blockwise logits are compared with ``torch.equal`` against the HF model run on the same rows in the
same batches (identical ops in identical order). Against one forward of all N rows they are compared with
``atol=1e-6``: a linear's GEMM over (b*T, H) rows may block its sums differently for a different b (seen on
this CPU with OPT + eager attention, 4.7e-9 apart), so bit-equality across batch sizes is not a property of
the walker.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path
from tiny_models import FAMILIES, MOE_FAMILIES, LAYERS, random_ids, tiny_model
from torch import nn
from transformers.cache_utils import Cache

from bitsmith.models import (
    ModelError,
    block_forward,
    blockwise_logits,
    capture_block_inputs,
    final_logits,
    get_architecture,
    iter_blocks,
    load_model,
    run_blocks,
)
from bitsmith.models.walker import _StopForward
from bitsmith.utils.device import accelerator_available, resolve_device

N, T = 3, 8


@torch.no_grad()
def _reference(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """HF's own forward on the same batches the walker uses: (N, T, V)."""
    chunks = [model(ids[i : i + batch_size], use_cache=False).logits for i in range(0, len(ids), batch_size)]
    return torch.cat(chunks)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_logits_match_hf_forward(family: str, batch_size: int) -> None:
    model = tiny_model(family)
    ids = random_ids(N, T)
    out = blockwise_logits(model, get_architecture(model), ids, "cpu", batch_size=batch_size)
    assert out.shape == (N, T, model.config.vocab_size)
    assert torch.equal(out, _reference(model, ids, batch_size))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
    # MoE experts run as one grouped matmul over the rows routed in the whole batch: fp32 summation order differs
    torch.testing.assert_close(out, whole, atol=5e-6 if family in MOE_FAMILIES else 1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_inputs_are_hf_hidden_states(family: str) -> None:
    """Block i's walked input equals HF's hidden_states[i] (HF's own record of what each block received)."""
    model = tiny_model(family)
    arch = get_architecture(model)
    ids = random_ids(2, T)
    with torch.no_grad():
        hf_hidden = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    inputs = capture_block_inputs(model, arch, ids, "cpu", batch_size=2)
    for index, block in iter_blocks(model, arch):
        assert torch.equal(inputs.hidden[0], hf_hidden[index]), f"block {index} input"
        inputs = run_blocks(model, arch, inputs, "cpu", start=index, stop=index + 1)
    assert index == LAYERS - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_records_clean_kwargs_and_restores_model(family: str) -> None:
    model = tiny_model(family)
    arch = get_architecture(model)
    blocks = [block for _, block in iter_blocks(model, arch)]
    inputs = capture_block_inputs(model, arch, random_ids(N, T), "cpu", batch_size=2)
    assert len(inputs) == 2 and [h.shape for h in inputs.hidden] == [(2, T, 32), (1, T, 32)]
    for kwargs in inputs.kwargs:
        assert "attention_mask" in kwargs and "position_ids" in kwargs
        assert kwargs.get("use_cache", False) is False
        assert not any(isinstance(v, Cache) for v in kwargs.values())
        assert ("position_embeddings" in kwargs) == (arch.rotary is not None)
    # the real blocks are back, with no hooks left on them or on the model
    assert [block for _, block in iter_blocks(model, arch)] == blocks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_layers_with_their_own_mask_get_their_own_kwargs() -> None:
    """Qwen2 with max_window_layers=1: block 1 gets a sliding-window mask, block 0 a full causal one."""
    model = tiny_model("qwen2")
    arch = get_architecture(model)
    ids = random_ids(N, T)
    inputs = capture_block_inputs(model, arch, ids, "cpu", batch_size=N)
    assert list(inputs.layer_kwargs) == [1]
    assert inputs.kwargs_for(1, 0) is not inputs.kwargs[0] and inputs.kwargs_for(0, 0) is inputs.kwargs[0]
    assert inputs.block_kwargs(0) is inputs.kwargs and inputs.block_kwargs(1) is inputs.layer_kwargs[1]
    assert inputs.kwargs_for(1, 0)["attention_mask"] is not None  # block 0 runs maskless sdpa (is_causal)
    with torch.no_grad():  # block 0's kwargs everywhere would be wrong: the mask matters at T=8 > window=4
        h = inputs.hidden[0]
        for _, block in iter_blocks(model, arch):
            h = block_forward(block, h, inputs.kwargs[0])
        wrong = final_logits(model, arch, h)
    assert not torch.allclose(wrong, _reference(model, ids, N))


def test_block_forward_accepts_tuple_outputs() -> None:
    model = tiny_model("llama")
    arch = get_architecture(model)
    inputs = capture_block_inputs(model, arch, random_ids(1, T), "cpu")
    block = model.model.layers[0]

    class TupleBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = block

        def forward(self, hidden: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, None]:
            return self.inner(hidden, **kwargs), None

    with torch.no_grad():
        expected = block_forward(block, inputs.hidden[0], inputs.kwargs[0])
        assert torch.equal(block_forward(TupleBlock(), inputs.hidden[0], inputs.kwargs[0]), expected)


def test_block_forward_keeps_gradients() -> None:
    model = tiny_model("llama")
    arch = get_architecture(model)
    inputs = capture_block_inputs(model, arch, random_ids(1, T), "cpu")
    block = model.model.layers[0]
    block_forward(block, inputs.hidden[0], inputs.kwargs[0]).square().mean().backward()
    assert block.self_attn.q_proj.weight.grad is not None


def test_stop_exception_is_not_a_value_error_and_real_errors_propagate() -> None:
    assert not issubclass(_StopForward, ValueError)
    model = tiny_model("llama")

    def boom(*_: object) -> None:
        raise ValueError("boom from the embeddings")

    handle = model.model.embed_tokens.register_forward_hook(boom)
    try:
        with pytest.raises(ValueError, match="boom from the embeddings"):
            capture_block_inputs(model, None, random_ids(1, T), "cpu")
    finally:
        handle.remove()
    # and a failed capture leaves the blocks in place
    assert all(type(block).__name__ == "LlamaDecoderLayer" for block in model.model.layers)


@pytest.mark.parametrize(
    ("ids", "batch_size", "message"),
    [
        (torch.zeros(T, dtype=torch.long), 1, "LongTensor \\(N, T\\)"),
        (torch.zeros(1, T), 1, "LongTensor \\(N, T\\)"),
        (torch.zeros(1, T, dtype=torch.long), 0, "batch_size must be >= 1"),
    ],
)
def test_bad_inputs_raise_model_error(ids: torch.Tensor, batch_size: int, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        capture_block_inputs(tiny_model("llama"), None, ids, "cpu", batch_size=batch_size)


def _sample_ids(name: str, rows: int, tokens: int) -> torch.Tensor:
    path = shared_path("data", f"{name}-samples", "test.jsonl")
    with path.open() as f:
        lines = [json.loads(next(f))["input_ids"][:tokens] for _ in range(rows)]
    return torch.tensor(lines, dtype=torch.long)


@pytest.mark.parametrize("name", ["aidreams260K", "stories260K"])
def test_real_models_blockwise_match(name: str) -> None:
    model, _ = load_model(shared_path("models", name))
    ids = _sample_ids(name, rows=3, tokens=32)
    out = blockwise_logits(model, get_architecture(model), ids, "cpu", batch_size=2)
    assert torch.equal(out, _reference(model, ids, 2))
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not accelerator_available(), reason="needs an accelerator")
@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_on_accelerator_keeps_model_on_cpu(family: str) -> None:
    model = tiny_model(family)
    ids = random_ids(N, T)
    out = blockwise_logits(model, None, ids, resolve_device(None), batch_size=2)
    assert out.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits, atol=1e-4, rtol=1e-4)
