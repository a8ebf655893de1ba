"""compressed-tensors export: the library's own decompressor gives back bitsmith's dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from bitsmith.cli.main import main
from bitsmith.export.packed import PACKED_DIR, PACKED_NAME, build_packed_linear, read_packed_config

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed: pip install -e '.[export]'")


def _quantize(tmp_path, name, *flags):
    model = str(shared_path("models", "aidreams260K"))
    samples = str(shared_path("data", "aidreams260K-samples"))
    out = tmp_path / name
    assert main(["quantize", model, "--method", "rtn", "--calib", samples, "--nsamples", "4", "--seqlen", "64",
                 "--pack", "-o", str(out), "-q", *flags]) == 0
    return out


def _bitsmith_weights(folder):
    body = read_packed_config(folder)
    tensors = load_file(str(folder / PACKED_DIR / PACKED_NAME))
    return {n: build_packed_linear(n, e, tensors, None).dequantized_weight() for n, e in body["layers"].items()}


def _decompress(folder):
    """Decompress every quantized module of a compressed-tensors folder with the library's registered compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for scheme in qc.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            out[name] = compressor.decompress(local, scheme)["weight"]
    return qc, sd, out


@pytest.mark.parametrize("flags, fmt", [
    (("--wbits", "4", "--group-size", "32"), "pack-quantized"),
    (("--wbits", "4", "--group-size", "32", "--sym"), "pack-quantized"),
    (("--wbits", "3", "--group-size", "4"), "pack-quantized"),  # divides 172: every layer compressed
    (("--wbits", "8", "--sym"), "pack-quantized"),  # per channel INT8
    (("--wformat", "fp8"), "naive-quantized"),  # per channel FP8 E4M3, weight-only (float-quantized is W8A8)
])
def test_export_decompresses_to_bitsmith_weights(tmp_path, flags, fmt):
    src = _quantize(tmp_path, "q", *flags)
    dest = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(dest), "-q"]) == 0
    qc, sd, dec = _decompress(dest)
    assert {s.format for s in qc.config_groups.values()} == {fmt}
    if "fp8" in flags:
        assert all(sd[f"{n}.weight"].dtype == torch.float8_e4m3fn for n in dec)  # real FP8 storage
    want = _bitsmith_weights(src)
    group = int(flags[flags.index("--group-size") + 1]) if "--group-size" in flags else None
    ragged = {n for n, w in want.items() if group and w.shape[1] % group}  # the 172-wide down_proj with g32
    assert set(dec) == set(want) - ragged and dec
    for name, w in dec.items():
        assert torch.equal(w.to(want[name].dtype), want[name]), name
    for name in ragged:  # left dense: the exact dequantized weight
        assert torch.equal(sd[f"{name}.weight"], want[name])


def test_ragged_groups_strict_is_one_line_error(tmp_path, capsys):
    src = _quantize(tmp_path, "q", "--wbits", "4", "--group-size", "32")
    dest = tmp_path / "ct"
    rc = main(["export", str(src), "--format", "compressed-tensors", "--output", str(dest), "--strict", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not dest.exists()
    assert len(err) == 1 and "down_proj" in err[0] and "not a multiple of group size 32" in err[0] \
        and "--group-size" in err[0]


@pytest.mark.parametrize("flags, match", [
    (("--wformat", "fp4", "--group-size", "32"), "e2m1"),
    (("--wbits", "4", "--group-size", "4", "--lorc-rank", "2"), "LoRC"),
])
def test_unrepresentable_layers_dense_or_strict_error(tmp_path, capsys, flags, match):
    src = _quantize(tmp_path, "q", *flags)
    rc = main(["export", str(src), "--format", "compressed-tensors", "--output", str(tmp_path / "s"), "--strict",
               "-q"])
    assert rc == 2 and match in capsys.readouterr().err
    rc = main(["export", str(src), "--format", "compressed-tensors", "--output", str(tmp_path / "d"), "-q"])
    assert rc == 2 and "no layer" in capsys.readouterr().err  # every layer unrepresentable → refused


@pytest.mark.parametrize("flags, match", [
    (("--wbits", "8", "--abits", "8"), "--sym"),  # asymmetric weights: no W8A8 kernel
    (("--wbits", "4", "--sym", "--abits", "6"), "nearest deployable: W8A8"),
    (("--wbits", "8", "--sym", "--abits", "8", "--kvbits", "8"), "kv-cache-dtype fp8"),
    (("--wformat", "fp4", "--group-size", "32", "--aformat", "fp8"), "W4AFP8"),
])
def test_export_refuses_undeployable_weight_activation_schemes(tmp_path, capsys, flags, match):
    src = _quantize(tmp_path, "wa", *flags)
    capsys.readouterr()
    assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(tmp_path / "c"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and not (tmp_path / "c").exists()


def test_symmetric_export_loads_in_transformers(tmp_path):
    """transformers' own compressed-tensors loader runs the exported model with the same logits."""
    from transformers import AutoModelForCausalLM

    from bitsmith.models import load_model

    src = _quantize(tmp_path, "q", "--wbits", "4", "--group-size", "4", "--sym")
    dest = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(dest), "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32).eval()
    ref, _ = load_model(src)
    ids = torch.arange(64).reshape(2, 32) % ref.config.vocab_size
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max()
    assert diff < 1e-4


# ---- weight × activation schemes (vLLM's W8A8, FP8_DYNAMIC, W4AFP8, W4A8) -------------------------------------
@pytest.fixture(scope="module")
def engine_src(tmp_path_factory):
    from tiny_models import engine_model

    return engine_model(tmp_path_factory.mktemp("engine") / "fp")


SCHEMES = {
    "W8A8": (("--wbits", "8", "--sym", "--abits", "8"), "int-quantized", ("int", False)),
    "FP8_DYNAMIC": (("--wformat", "fp8", "--aformat", "fp8"), "float-quantized", ("float", True)),
    "W4AFP8": (("--wbits", "4", "--sym", "--group-size", "128", "--aformat", "fp8"), "pack-quantized", ("float", True)),
    "W4A8": (("--wbits", "4", "--sym", "--group-size", "128", "--abits", "8"), "pack-quantized", ("int", False)),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_activation_export_is_the_scheme_and_the_same_function(tmp_path, engine_src, scheme):
    """The config names bitsmith's activation quantization exactly (8 bits, per token, dynamic; INT8 asymmetric as
    bitsmith computes it), the weights decompress to bitsmith's, and compressed-tensors' own fake quantization
    under the stored args equals bitsmith's activation quantizer on the model's real activations."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    import bitsmith
    from bitsmith.export.compressed import activation_scheme
    from bitsmith.formats import spec_from_dict

    flags, fmt, (kind, symmetric) = SCHEMES[scheme]
    src = tmp_path / "q"
    assert main(["quantize", str(engine_src), "--method", "rtn", "--calib", str(_stories()), "--nsamples", "4",
                 "--seqlen", "64", "-o", str(src), "-q", *flags]) == 0
    recipe = json.loads((src / "bitsmith.json").read_text())["recipe"]
    assert activation_scheme(spec_from_dict(recipe["weight"]), spec_from_dict(recipe["act"])) == scheme
    dest = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(dest), "-q"]) == 0
    qc, sd, dec = _decompress(dest)
    want = _bitsmith_weights(src)
    assert set(dec) == set(want)
    for name, w in dec.items():
        assert torch.equal(w.to(want[name].dtype), want[name]), name
    (group,) = qc.config_groups.values()
    assert group.format == fmt
    act = group.input_activations
    assert (act.num_bits, act.type, act.symmetric, act.strategy, act.dynamic) == (8, kind, symmetric, "token", True)

    model = bitsmith.load(src)
    seen = {}
    lin = model.model.layers[1].mlp.down_proj
    handle = lin.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()), prepend=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (2, 32)))
    handle.remove()
    x = seen["x"]
    scale, zero = compute_dynamic_scales_and_zp(x, act, lin)
    theirs = fake_quantize(x, scale, zero, act)
    assert torch.equal(lin.act_quantizer(x), theirs)
    assert (theirs - x).abs().max() > 0  # really quantized


def _stories():
    return shared_path("data", "stories260K-samples", "valid.jsonl")


@pytest.mark.parametrize("flags", [("--wbits", "4", "--group-size", "4"), ("--wbits", "8", "--sym", "--abits", "8")])
def test_export_of_a_no_pack_folder_equals_the_packed_export(tmp_path, flags):
    """Without packed codes the export recovers them from the on-grid weights: the same checkpoint."""
    packed = _quantize(tmp_path, "p", *flags)
    plain = tmp_path / "n"
    assert main(["quantize", str(shared_path("models", "aidreams260K")), "--method", "rtn", "--calib",
                 str(shared_path("data", "aidreams260K-samples")), "--nsamples", "4", "--seqlen", "64",
                 "--no-pack", "-o", str(plain), "-q", *flags]) == 0
    assert not (plain / PACKED_DIR).exists()
    for src in (packed, plain):
        assert main(["export", str(src), "--format", "compressed-tensors", "--output", str(src) + "-ct", "-q"]) == 0
    _, _, a = _decompress(tmp_path / "p-ct")
    _, _, b = _decompress(tmp_path / "n-ct")
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6 * float(a[name].abs().max()))
