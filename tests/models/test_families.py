"""Today's families end to end: Qwen3, Gemma 2/3, Phi-3 and the mixtures of experts (Mixtral, Qwen3-MoE).

Mixture of experts: the split into per-expert linears computes what the fused 3-D experts compute, saving writes the
checkpoint's own per-expert names, each expert is calibrated on its routed tokens, and an expert the router never
picks is rounded to nearest and reported. Every family: GPTQ and the default recipe lower the block-output error
below RTN's.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import MOE_FAMILIES, random_ids, tiny_model
from transformers import AutoModelForCausalLM

from bitsmith.algorithms.rtn import rtn_quantize
from bitsmith.algorithms.default import BITSMITH
from bitsmith.config import QuantConfig
from bitsmith.export.hf import save_quantized
from bitsmith.formats import IntFormat, PerGroup, QuantSpec
from bitsmith.models import find_linears, fused_experts, get_architecture, get_blocks, split_experts
from bitsmith.models.moe import ExpertList
from bitsmith.pipeline import quantize_model

CPU = torch.device("cpu")
NEW = ("qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3moe")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_experts_compute_the_fused_experts(family):
    model = tiny_model(family)
    arch = get_architecture(model)
    ids = random_ids(2, 12)
    ref = _logits(model, ids)
    fused = get_blocks(model, arch)[0].get_submodule(arch.moe.experts).gate_up_proj.detach().clone()
    assert split_experts(model, arch) == len(get_blocks(model, arch))
    assert split_experts(model, arch) == 0  # idempotent
    experts = get_blocks(model, arch)[0].get_submodule(arch.moe.experts)
    assert isinstance(experts, ExpertList) and len(experts) == 4
    inter = fused.shape[1] // 2
    assert torch.equal(experts[2].gate_proj.weight, fused[2, :inter])
    assert torch.equal(experts[2].up_proj.weight, fused[2, inter:])
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=0)
    with fused_experts(model, arch):  # what save_pretrained sees: the fused module, same weights
        again = get_blocks(model, arch)[0].get_submodule(arch.moe.experts)
        assert not isinstance(again, ExpertList) and torch.equal(again.gate_up_proj, fused)
        torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=0)
    assert isinstance(get_blocks(model, arch)[0].get_submodule(arch.moe.experts), ExpertList)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_quantized_moe_saves_the_checkpoint_layout(tmp_path, family):
    """GPTQ W4 g16 on every expert; the saved folder uses the checkpoint's names (Mixtral: block_sparse_moe.
    experts.E.w1/w2/w3) and reloads in transformers to the quantized model's logits."""
    model = tiny_model(family)
    arch = get_architecture(model)
    ids = random_ids(8, 16)
    spec = QuantSpec(IntFormat(4), PerGroup(16))
    res = quantize_model(model, arch, QuantConfig(method="gptq", weight=spec, nsamples=8, seqlen=16), ids, CPU,
                         progress=False)
    experts = [n for n in res.frozen if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # blocks × experts × (gate, up, down)
    assert all(b["experts"]["rtn"] == [] and sum(b["experts"]["tokens"]) == 8 * 16 * 2 for b in res.blocks)
    save_quantized(model, None, tmp_path / "q", {"recipe": {}})
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in experts:
        assert arch.moe.saved_name(name) + ".weight" in keys
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_an_expert_without_tokens_is_rounded_to_nearest_and_reported(tmp_path):
    """Five experts, two per token; the router's rows make expert 4 lose to one of ±w and one of ±u for every
    token, so it gets no calibration token: GPTQ runs, expert 4 is RTN, the report lists the counts."""
    model = tiny_model("qwen3moe", num_experts=5)
    arch = get_architecture(model)
    g = torch.Generator().manual_seed(5)
    for block in get_blocks(model, arch):
        router = block.get_submodule(arch.moe.router)
        w, u = torch.randn(2, router.weight.shape[1], generator=g)
        with torch.no_grad():
            router.weight.copy_(torch.stack([w, -w, u, -u, torch.zeros_like(w)]) * 3)
    split_experts(model, arch)
    original = get_blocks(model, arch)[1].get_submodule("mlp.experts.4.up_proj").weight.detach().clone()
    spec = QuantSpec(IntFormat(4), PerGroup(16))
    cfg = QuantConfig(method="gptq", weight=spec, nsamples=4, seqlen=16)
    res = quantize_model(model, arch, cfg, random_ids(4, 16), CPU, progress=False)
    for b in res.blocks:
        assert b["experts"]["tokens"][4] == 0 and b["experts"]["rtn"] == [4]
        assert min(b["experts"]["tokens"][:4]) > 0
    expected = rtn_quantize(original, spec).dequantize()
    assert torch.equal(get_blocks(model, arch)[1].get_submodule("mlp.experts.4.up_proj").weight.detach(), expected)
    from bitsmith.eval.report import render_markdown
    md = render_markdown({"recipe": cfg.to_dict(), "blocks": res.blocks})
    assert "## Experts" in md and "| 1 |" in md and "round to nearest" in md
    assert json.dumps(res.blocks[0]["experts"])  # serialisable into report.json


def _block_mse(family: str, method: str, **kw) -> float:
    model = tiny_model(family)
    arch = get_architecture(model)
    spec = QuantSpec(IntFormat(3), PerGroup(16))
    res = quantize_model(model, arch, QuantConfig(method=method, weight=spec, nsamples=8, seqlen=16, **kw),
                         random_ids(8, 16, seed=3), CPU, progress=False)
    return sum(b["output_mse"] for b in res.blocks)


@pytest.mark.parametrize("family", NEW)
def test_gptq_and_default_recipe_beat_rtn(family):
    rtn = _block_mse(family, "rtn")
    assert _block_mse(family, "gptq") < rtn
    few = BITSMITH.replace(steps=40, eval_every=20, e2e_steps=5)  # end-to-end stage included
    assert _block_mse(family, "bitsmith", options=few) < rtn


@pytest.mark.parametrize("family", NEW)
def test_cli_quantize_export_compressed_tensors_loads_in_transformers(tmp_path, family):
    """bitsmith quantize (GPTQ W4 g16 sym, packed) → export compressed-tensors → transformers' own loader gives
    bitsmith's logits; every expert linear is stored under the checkpoint's names."""
    pytest.importorskip("compressed_tensors")
    from bitsmith.cli.main import main
    from bitsmith.models import load_model

    tiny_model(family).save_pretrained(tmp_path / "m")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in random_ids(8, 32, seed=7).tolist()))
    src, dest = tmp_path / "q", tmp_path / "ct"
    assert main(["quantize", str(tmp_path / "m"), "--method", "gptq", "--wbits", "4", "--group-size", "16", "--sym",
                 "--calib", str(calib), "--nsamples", "8", "--seqlen", "32", "--pack", "-o", str(src), "-q"]) == 0
    assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(dest), "-q"]) == 0
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    arch = get_architecture(tiny_model(family))
    if arch.moe is not None:
        want = arch.moe.saved_name("model.layers.1.mlp.experts.3.down_proj") + ".weight_packed"
        assert want in keys
    model = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32).eval()
    ref, _ = load_model(src)
    ids = random_ids(2, 32, seed=9)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=0)
    import bitsmith
    from bitsmith.nn.packed import PackedLinear

    packed = bitsmith.load(src)  # the packed codes, every expert linear included
    n_linears = sum(len(find_linears(b, arch)) for b in get_blocks(ref, arch))
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == n_linears
    torch.testing.assert_close(_logits(packed, ids), _logits(ref, ids), atol=1e-5, rtol=0)


def _saved(tmp_path, family):
    tiny_model(family).save_pretrained(tmp_path / "m")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in random_ids(8, 32, seed=7).tolist()))
    return tmp_path / "m", calib


@pytest.mark.parametrize("family", NEW)
def test_cli_awq_and_omniquant_w4a4_and_fp_eval(tmp_path, family, capsys):
    """AWQ and OmniQuant (LWC + LET, W4A4) run from the CLI; evaluating the unquantized folder gives the plain
    transformers perplexity on the same windows."""
    from bitsmith.cli.main import main

    model_dir, calib = _saved(tmp_path, family)
    common = ["--calib", str(calib), "--nsamples", "8", "--seqlen", "32", "-q"]
    assert main(["quantize", str(model_dir), "--method", "awq", "--wbits", "4", "--group-size", "16", *common,
                 "-o", str(tmp_path / "awq")]) == 0
    assert main(["quantize", str(model_dir), "--method", "omniquant", "--let", "--epochs", "1", "--wbits", "4",
                 "--abits", "4", *common, "-o", str(tmp_path / "omni")]) == 0
    body = json.loads((tmp_path / "omni" / "bitsmith.json").read_text())
    assert body["recipe"]["act"] is not None and len(body["blocks"]) == 2
    capsys.readouterr()
    out = tmp_path / "ppl.json"
    assert main(["eval", str(model_dir), "--ppl", str(calib), "--seqlen", "32", "--json", str(out), "-q"]) == 0
    got = next(iter(json.loads(out.read_text())["ppl"].values()))
    ids = random_ids(8, 32, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    logp = torch.log_softmax(_logits(hf, ids).float(), dim=-1)
    want = float(torch.exp(-logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()))
    assert got == pytest.approx(want, rel=1e-5)


def test_gptq_collects_many_experts_hessians_in_passes(monkeypatch):
    """Hessians split into passes (a budget holding one layer's) give exactly the codes of one pass; the memory
    plan counts at most the budget's worth of Hessians."""
    from bitsmith.algorithms import gptq_block as block_mod
    from bitsmith.utils.memory import block_need

    assert block_mod.hessian_passes({"a": 32, "b": 32, "c": 64}, 2 * 4 * 32 * 32) == [["a", "b"], ["c"]]
    assert block_mod.hessian_passes({"a": 32, "b": 32}, 10**9) == [["a", "b"]]
    spec = QuantSpec(IntFormat(4), PerGroup(16))

    def run(passes):
        model = tiny_model("mixtral")
        if passes is not None:
            monkeypatch.setattr(block_mod, "hessian_passes", passes)
        res = quantize_model(model, get_architecture(model), QuantConfig(method="gptq", weight=spec, nsamples=4,
                             seqlen=16), random_ids(4, 16), CPU, progress=False)
        return res.frozen

    one = run(None)
    calls = []

    def single(widths, budget):
        calls.append(len(widths))
        return [[n] for n in widths]

    split = run(single)
    assert calls and max(calls) == 4 + 12  # attention + 4 experts × 3 linears, one per pass
    assert one.keys() == split.keys() and all(torch.equal(one[n].codes, split[n].codes) for n in one)
    kw = dict(weight_bytes=0, linears=[(64, 32)] * 12, hidden=32, intermediate=64, heads=4, batch=1, seqlen=16,
              elem=4, gptq=True)
    assert block_need(**kw, hessian_budget=4 * 32 * 32)["GPTQ Hessians"] == 4 * 32 * 32
    assert block_need(**kw)["GPTQ Hessians"] == 11 * 4 * 32 * 32
