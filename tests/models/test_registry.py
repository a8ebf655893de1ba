"""Architecture rows are right about the real HF modules: every name resolves, and the wiring they claim
(norm → linears, v → o, up → down, fused qkv rows, GQA groups) is checked behaviourally on tiny random models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import shared_path
from tiny_models import ARCH_OF_FAMILY, FAMILIES, HIDDEN, LAYERS, random_ids, tiny_config, tiny_model
from torch import nn
from transformers import AutoConfig, BertConfig

from bitsmith.models import (
    ARCHITECTURES,
    Architecture,
    FusedQKV,
    Geometry,
    ModelError,
    block_forward,
    capture_block_inputs,
    find_linears,
    geometry,
    get_architecture,
    get_blocks,
    resolve,
    expand,
    rope_pairs,
    split_experts,
    supported_architectures,
)

FAMILY_OF_ARCH = {arch: family for family, arch in ARCH_OF_FAMILY.items()}


def _split_model(family: str, **kw) -> nn.Module:
    """A tiny model of ``family`` with any fused experts split into per-expert linears (what bitsmith walks)."""
    model = tiny_model(family, **kw)
    split_experts(model, get_architecture(model))
    return model


def _names(block: nn.Module, names) -> list[str]:
    return [n for name in names for n in expand(block, name)]


def test_every_row_has_a_tiny_model() -> None:
    assert set(ARCHITECTURES) == set(FAMILY_OF_ARCH), "add a tiny config for each new row in tiny_models.py"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_row_paths_resolve_to_real_modules(name: str) -> None:
    arch = ARCHITECTURES[name]
    model = _split_model(FAMILY_OF_ARCH[name])
    assert get_architecture(model) is arch and get_architecture(model.config) is arch
    assert len(get_blocks(model, arch)) == LAYERS
    for path in arch.embeddings:
        assert isinstance(resolve(model, path), nn.Module)  # OPT's project_in exists at word_embed_proj_dim=16
    if arch.rotary is not None:
        assert isinstance(resolve(model, arch.rotary), nn.Module)
    assert isinstance(resolve(model, arch.final_norm), nn.Module)
    assert all(isinstance(resolve(model, p), nn.Linear) for p in arch.final_extra)
    assert isinstance(resolve(model, arch.lm_head), nn.Linear)
    for _, block in enumerate(get_blocks(model, arch)):
        linears = find_linears(block, arch)
        names = _names(block, arch.linear_names)
        assert tuple(linears)[: len(names)] == tuple(names)
        router = arch.moe.router if arch.moe is not None else None
        for norm_name in [n for n, _ in arch.norm_to_linears] + list(arch.other_norms):
            norm = resolve(block, norm_name)
            expected = nn.LayerNorm if arch.norm_kind == "layer" else nn.Module
            assert isinstance(norm, expected) and ("RMSNorm" in type(norm).__name__) == (arch.norm_kind == "rms")
        for _, targets in arch.norm_to_linears:
            assert all(isinstance(resolve(block, t), nn.Linear) for t in _names(block, targets) if t != router)
        for pair in (arch.q_to_k, arch.v_to_o, arch.up_to_down):
            assert pair is None or all(isinstance(resolve(block, p), nn.Linear) for p in _names(block, pair))


@pytest.mark.parametrize("family", FAMILIES)
def test_find_linears_finds_all_linears_of_a_block(family: str) -> None:
    model = _split_model(family)
    block = get_blocks(model)[0]
    every = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert set(find_linears(block, get_architecture(model))) == every == set(find_linears(block))


def _record(block: nn.Module, names: list[str], inputs: bool) -> tuple[dict[str, torch.Tensor], list]:
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            seen[name] = (args[0] if inputs else out).detach()
        handles.append(resolve(block, name).register_forward_hook(hook))
    return seen, handles


def _run_block0(model: nn.Module, names_in: list[str], names_out: list[str]) -> tuple[dict, dict, dict]:
    arch = get_architecture(model)
    block = get_blocks(model, arch)[0]
    inputs = capture_block_inputs(model, arch, random_ids(2, 6), "cpu", batch_size=2)
    ins, h1 = _record(block, names_in, inputs=True)
    outs, h2 = _record(block, names_out, inputs=False)
    with torch.no_grad():
        block_forward(block, inputs.hidden[0], inputs.kwargs[0])
    for h in h1 + h2:
        h.remove()
    return ins, outs, {"x": inputs.hidden[0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_to_linears_linears_read_that_norms_output(family: str) -> None:
    arch = ARCHITECTURES[ARCH_OF_FAMILY[family]]
    model = _split_model(family)
    block = get_blocks(model, arch)[0]
    norms = [norm for norm, _ in arch.norm_to_linears]
    targets = [t for _, ts in arch.norm_to_linears for t in _names(block, ts)]
    ins, outs, _ = _run_block0(model, targets, norms)
    for norm, linears in arch.norm_to_linears:
        for linear in _names(block, linears):
            if ".experts." in linear:  # an expert reads the rows of the norm's output routed to it
                rows = outs[norm].reshape(-1, outs[norm].shape[-1])
                if linear in ins:
                    assert all((rows == x).all(dim=1).any() for x in ins[linear]), f"{norm} -> {linear}"
                continue
            # OPT flattens (b, T, H) to (b*T, H) before fc1; an MoE router too
            assert torch.equal(ins[linear].reshape(outs[norm].shape), outs[norm]), f"{norm} -> {linear}"
    if arch.moe is not None:
        assert sum(".experts." in n for n in ins) >= 2  # experts were reached and checked


def _v_rows(block: nn.Module, arch: Architecture, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor | None]:
    linear = resolve(block, arch.v_to_o[0])
    if arch.fused_qkv is None:
        return linear.weight, linear.bias
    rows = arch.fused_qkv.rows("v", geom)
    return linear.weight[rows], None if linear.bias is None else linear.bias[rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_v_to_o_and_gqa_groups(family: str) -> None:
    """At position 0 a token attends only to itself, so o's input there is v (each kv head repeated `groups` times)."""
    arch = ARCHITECTURES[ARCH_OF_FAMILY[family]]
    model = tiny_model(family)
    geom = geometry(model.config)
    v_in_name = arch.norm_to_linears[0][1][-1]
    ins, _, _ = _run_block0(model, [v_in_name, arch.v_to_o[1]], [])
    block = get_blocks(model)[0]
    weight, bias = _v_rows(block, arch, geom)
    v0 = nn.functional.linear(ins[v_in_name][:, 0], weight, bias)  # (b, kv_heads * head_dim)
    v0 = v0.view(-1, geom.kv_heads, geom.head_dim).repeat_interleave(geom.groups, dim=1).flatten(1)
    torch.testing.assert_close(ins[arch.v_to_o[1]][:, 0], v0, atol=1e-6, rtol=1e-6)


def test_neox_fused_q_rows() -> None:
    """Zeroing the rows FusedQKV calls q makes every score 0: o's input becomes the running mean of v."""
    model = tiny_model("neox")
    arch = get_architecture(model)
    geom = geometry(model.config)
    block = get_blocks(model)[0]
    qkv = resolve(block, arch.fused_qkv.linear)
    q_rows = arch.fused_qkv.rows("q", geom)
    with torch.no_grad():
        qkv.weight[q_rows] = 0
        qkv.bias[q_rows] = 0
    ins, _, _ = _run_block0(model, [arch.fused_qkv.linear, arch.v_to_o[1]], [])
    weight, bias = _v_rows(block, arch, geom)
    v = nn.functional.linear(ins[arch.fused_qkv.linear], weight, bias)  # (b, T, heads * head_dim)
    running_mean = v.cumsum(1) / torch.arange(1, v.shape[1] + 1)[None, :, None]
    torch.testing.assert_close(ins[arch.v_to_o[1]], running_mean, atol=1e-5, rtol=1e-5)


def test_fused_rows_layouts() -> None:
    gqa = Geometry(hidden=32, heads=4, kv_heads=2, head_dim=2, rope=True, rotary_dim=2)
    concat = FusedQKV(linear="qkv", layout="concat")
    assert concat.rows("q", gqa).tolist() == list(range(8))
    assert concat.rows("k", gqa).tolist() == list(range(8, 12))
    assert concat.rows("v", gqa).tolist() == list(range(12, 16))
    mha = dataclasses.replace(gqa, kv_heads=4)
    per_head = FusedQKV(linear="qkv", layout="per_head")
    assert per_head.rows("k", mha).tolist() == [2, 3, 8, 9, 14, 15, 20, 21]
    with pytest.raises(ModelError, match="heads == kv_heads"):
        per_head.rows("v", gqa)
    with pytest.raises(ValueError, match="layout"):
        FusedQKV(linear="qkv", layout="interleaved")


@pytest.mark.parametrize("family", FAMILIES)
def test_up_down_equivalent_flag_is_true_to_the_activation(family: str) -> None:
    """Scale up's rows by s > 0 and down's columns by 1/s: the block is unchanged exactly when the flag says so."""
    arch = ARCHITECTURES[ARCH_OF_FAMILY[family]]
    model = _split_model(family)
    block = get_blocks(model)[0]
    inputs = capture_block_inputs(model, arch, random_ids(2, 6), "cpu", batch_size=2)
    with torch.no_grad():
        before = block_forward(block, inputs.hidden[0], inputs.kwargs[0])
        for up_name, down_name in zip(*(_names(block, [name]) for name in arch.up_to_down)):  # each expert's pair
            up, down = resolve(block, up_name), resolve(block, down_name)
            rows = slice(None)
            if up_name == arch.gate_up:  # Phi-3: [gate | up] rows, only the up half multiplies down's input
                rows = slice(up.out_features // 2, None)
            s = torch.rand(down.in_features, generator=torch.Generator().manual_seed(3)) * 4 + 0.25
            up.weight[rows].mul_(s[:, None])
            if up.bias is not None:
                up.bias[rows].mul_(s)
            down.weight.div_(s[None, :])
        after = block_forward(block, inputs.hidden[0], inputs.kwargs[0])
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5) == arch.up_down_equivalent


def test_qwen2_has_qkv_biases_llama_does_not() -> None:
    for family, has_bias in (("qwen2", True), ("llama", False)):
        arch = ARCHITECTURES[ARCH_OF_FAMILY[family]]
        linears = find_linears(get_blocks(tiny_model(family))[0], arch)
        assert [linears[n].bias is not None for n in arch.attn_linears] == [has_bias] * 3 + [False]


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama", (HIDDEN, 4, 2, 8, True, 8)),
        ("mistral", (HIDDEN, 4, 2, 8, True, 8)),
        ("qwen2", (HIDDEN, 4, 2, 8, True, 8)),
        ("opt", (HIDDEN, 4, 4, 8, False, 0)),
        ("neox", (HIDDEN, 4, 4, 8, True, 4)),  # rotary_pct 0.5 -> rope_parameters["partial_rotary_factor"]
    ],
)
def test_geometry(family: str, expected: tuple) -> None:
    geom = geometry(tiny_config(family))
    assert dataclasses.astuple(geom) == expected
    assert geom.groups == expected[1] // expected[2]
    assert rope_pairs(geom).shape == (expected[5] // 2, 2)


def test_geometry_of_real_gqa_checkpoint() -> None:
    config = AutoConfig.from_pretrained(shared_path("models", "stories260K"), local_files_only=True)
    geom = geometry(config)
    assert (geom.hidden, geom.heads, geom.kv_heads, geom.head_dim, geom.rotary_dim) == (64, 8, 4, 8, 8)
    assert rope_pairs(geom)[0].tolist() == [0, 4]


def test_config_dependent_flags() -> None:
    opt, neox = ARCHITECTURES["OPTForCausalLM"], ARCHITECTURES["GPTNeoXForCausalLM"]
    assert opt.flag("pre_norm", tiny_config("opt")) is True
    assert opt.flag("pre_norm", tiny_config("opt", do_layer_norm_before=False)) is False  # OPT-350m
    assert neox.flag("parallel_residual", tiny_config("neox")) is True
    assert neox.flag("parallel_residual", tiny_config("neox", use_parallel_residual=False)) is False
    assert ARCHITECTURES["LlamaForCausalLM"].flag("parallel_residual", tiny_config("llama")) is False


def test_unknown_architecture_lists_supported_names() -> None:
    config = BertConfig(architectures=["BertForMaskedLM"])
    with pytest.raises(ModelError, match="unsupported architecture 'BertForMaskedLM'") as info:
        get_architecture(config)
    assert all(name in str(info.value) for name in supported_architectures())
    with pytest.raises(ModelError, match="unsupported architecture"):
        get_architecture(BertConfig())  # no architectures entry at all


def test_row_must_list_its_edge_linears() -> None:
    row = ARCHITECTURES["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="not listed"):
        dataclasses.replace(row, norm_to_linears=(("input_layernorm", ("self_attn.qkv",)),))
    with pytest.raises(ValueError, match="norm_kind"):
        dataclasses.replace(row, norm_kind="batch")


def test_mismatched_row_fails_loudly() -> None:
    model = tiny_model("opt")
    llama_row = ARCHITECTURES["LlamaForCausalLM"]
    with pytest.raises(ModelError, match="no nn.Linear named"):
        find_linears(get_blocks(model)[0], llama_row)
    with pytest.raises(ModelError, match="has no module 'model.layers'"):
        get_blocks(model, llama_row)
