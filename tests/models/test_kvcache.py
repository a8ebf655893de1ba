"""KV-cache quantization through the attention interface: post-RoPE keys, per head and token, on every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from torch import nn

from bitsmith.formats import IntFormat, PerToken, QuantSpec
from bitsmith.models import get_architecture, get_blocks
from bitsmith.models.kvcache import attention_path, disable_kv_quant, enable_kv_quant
from bitsmith.nn import set_quant_state


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_quant_changes_logits_by_bits_and_disables_exactly(family, impl):
    if impl == "sdpa" and family == "gemma2":
        pytest.skip("Gemma 2 has no sdpa attention in transformers (its attention soft-capping needs eager)")
    model = tiny_model(family, attn_implementation=impl)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    arch = get_architecture(model)
    errs = {}
    for bits in (8, 2):
        enable_kv_quant(model, arch, QuantSpec(IntFormat(bits), PerToken()))
        errs[bits] = float((_logits(model, ids) - ref).abs().max())
        set_quant_state(model, weight=False, act=False)
        assert torch.equal(_logits(model, ids), ref)  # switched off through the common state switch
        disable_kv_quant(model, arch)
    assert 0 < errs[8] < errs[2] / 10
    assert model.config._attn_implementation == impl
    assert torch.equal(_logits(model, ids), ref)


class _Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


def test_keys_are_seen_after_rope_per_kv_head():
    model = tiny_model("llama")  # 4 heads, 2 kv heads, head_dim 8
    arch = get_architecture(model)
    enable_kv_quant(model, arch, QuantSpec(IntFormat(8), PerToken()))
    block = get_blocks(model, arch)[0]
    attn = block.get_submodule(attention_path(arch))
    spy = attn.kv_quantizer = _Spy()
    captured = {}
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", out.detach()))
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    _logits(model, ids)
    hook.remove()
    key, value = spy.seen[0], spy.seen[1]
    assert key.shape == value.shape == (1, 2, 10, 8)  # (b, kv_heads, T, head_dim): before GQA repetition
    k_pre = captured["k"].view(1, 10, 2, 8).transpose(1, 2)
    assert torch.allclose(key[:, :, 0], k_pre[:, :, 0], atol=1e-6)  # RoPE is the identity at position 0
    assert not torch.allclose(key[:, :, 5], k_pre[:, :, 5], atol=1e-3)  # and rotates later positions


def test_unsupported_attention_implementation():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa and eager"):
        enable_kv_quant(model, get_architecture(model), QuantSpec(IntFormat(4), PerToken()))
