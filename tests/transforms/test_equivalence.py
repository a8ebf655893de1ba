"""LET edges are function-preserving on every family (GQA, RoPE, partial rotary, fused qkv, biases, shifts),
both reparametrised and after the in-place fold."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from torch.nn.utils import parametrize

from bitsmith.models import get_architecture, get_blocks, split_experts
from bitsmith.models.edges import let_edges
from bitsmith.transforms import fold_edges


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# Gemma's norms multiply by (1 + w) in float32 even in a float64 model: their folds are exact up to fp32 rounding
TOLERANCE = {"gemma2": 1e-5, "gemma3": 1e-5}


@pytest.mark.parametrize("family", FAMILIES)
def test_random_scales_and_shifts_preserve_logits(family):
    tol = TOLERANCE.get(family, 1e-9)
    model = tiny_model(family).double()
    split_experts(model, get_architecture(model))  # MoE: per-expert linears (the 3-D experts need fp32 here)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    arch = get_architecture(model)
    g = torch.Generator().manual_seed(1)
    all_edges = []
    for block in get_blocks(model, arch):
        edges = let_edges(block, arch, model.config, shift=True, up_down=True)
        assert {e.name for e in edges} >= {"qk", "vo"}
        for e in edges:
            with torch.no_grad():
                e.scale.copy_(torch.rand(e.dim, generator=g, dtype=torch.float64) * 3 + 0.2)
                if e.shift is not None:
                    e.shift.copy_(torch.randn(e.dim, generator=g, dtype=torch.float64))
            e.double()
            e.register()
        all_edges += edges
    changed = any(not torch.equal(p, q) for p, q in zip(
        [m.weight for m in model.modules() if parametrize.is_parametrized(m, "weight")],
        [m.parametrizations.weight.original for m in model.modules() if parametrize.is_parametrized(m, "weight")]))
    assert changed  # the weights really are transformed
    assert torch.allclose(_logits(model, ids), ref, atol=tol, rtol=tol)
    if family in ("opt", "neox"):
        assert any(e.shift is not None for e in all_edges)  # LayerNorm + biases: shifts are used
    fold_edges(all_edges)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.allclose(_logits(model, ids), ref, atol=tol, rtol=tol)


def test_qk_scale_respects_rope_pairs_and_gqa():
    model = tiny_model("llama").double()  # 4 heads, 2 kv heads, full rotary
    arch = get_architecture(model)
    block = get_blocks(model, arch)[0]
    edges = {e.name: e for e in let_edges(block, arch, model.config)}
    qk = edges["qk"]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert qk.dim == 2 * head_dim // 2  # kv_heads × (head_dim − rotary_dim/2)
    q_site, k_site = qk.sites
    kmap = k_site.map.view(2, head_dim)
    assert torch.equal(kmap[:, : head_dim // 2], kmap[:, head_dim // 2 :])  # rotary pairs share a scale
    qmap = q_site.map.view(4, head_dim)
    assert torch.equal(qmap[0], qmap[1]) and torch.equal(qmap[0], kmap[0])  # query heads 0,1 use kv head 0


def test_free_qk_scale_breaks_rope_equivalence():
    """Control: an unshared scale inside a rotary pair changes the output (why the pairing matters)."""
    model = tiny_model("llama").double()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    block = get_blocks(model, get_architecture(model))[0]
    with torch.no_grad():
        s = torch.ones(model.config.num_key_value_heads * 8, dtype=torch.float64)
        s[0] = 3.0  # scale dim 0 of kv head 0 but not its rotary partner
        q, k = block.self_attn.q_proj, block.self_attn.k_proj
        k.weight[:8] *= s[:8, None]
        q.weight[:8] /= s[:8, None]
        q.weight[8:16] /= s[:8, None]
    assert not torch.allclose(_logits(model, ids), ref, atol=1e-6)
