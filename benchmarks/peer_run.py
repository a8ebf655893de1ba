"""Quantize one fixture model with a PEER tool (AutoRound or llm-compressor) and save it fake-quantized.

Runs INSIDE the peer virtual environment built by ``benchmarks/peers_setup.sh`` (never in bitsmith's; it does not
import bitsmith). ``benchmarks/peers.py`` calls it once per (model, setting, tool) and evaluates the saved folder with
bitsmith's own perplexity code.

What it does:

1. Calibration tokens: the first ``--nsamples`` lines of ``--calib`` (pre-tokenized ``.jsonl``), the first
   ``--seqlen`` ids of each, in file order (the official-OmniQuant reference runner's protocol). Their sha256 is
   reported so the caller can check that every tool saw the same tensor.
2. Quantizes every linear of the decoder blocks (never ``lm_head`` / embeddings) with the tool:
   ``autoround``: ``AutoRound(model, tokenizer, alg_configs=SignRoundConfig(iters=..., ...), dataset=[token ids],
   nsamples, seqlen, batch_size=min(8, nsamples), device_map="cpu", amp=False, low_gpu_mem_usage=False,
   enable_torch_compile=False).quantize()``, its default learning rate (1/iters). With ``--all-layers`` a
   monkeypatch of ``auto_round.compressors.layer_config_resolver.apply_layer_config_special_cases`` undoes
   AutoRound's silent rule that leaves every INT weight-only linear whose shape is not a multiple of 32 (and every
   MX/NV-FP linear whose input is not a multiple of the group) in 16 bits; AutoRound has no option for it.
   ``llmc-gptq`` / ``llmc-awq``: ``llmcompressor.oneshot`` with ``GPTQModifier`` (default dampening 0.01) or
   ``AWQModifier`` + ``QuantizationModifier`` (AWQ scales, then min/max RTN), ``ignore=["lm_head"]``, a
   ``datasets.Dataset`` of the token ids, no shuffling. llm-compressor refuses groups that do not divide a layer's
   input (172-wide ``down_proj`` with groups of 32), and with ``bypass_divisibility_checks=True`` its observer
   crashes on them; so for such settings those layers are added to ``ignore`` and reported as left 16-bit.
3. Saves a plain Hugging Face folder (fp32, the original parameter names) holding the dequantized weights that the
   tool's own forward pass uses, and ``peer_run.json``; prints the same JSON as the last stdout line:
   ``wall_s`` (the tool's quantization call only: AutoRound construction + ``quantize()``; ``oneshot()``),
   per-layer quantized / left-16-bit lists, the largest number of distinct values in any row-group of each
   quantized weight (a check that the weights really are on a 2^bits grid), versions, notes.

Weight formats: ``int`` (asymmetric unless ``--sym``), per channel or ``--group-size``; ``fp4``: the tool's FP4
(E2M1) format with groups of 32 (AutoRound ``mx_fp``, llm-compressor ``MXFP4``: power-of-two E8M0 group scales).
Activations (``--abits 4 --aformat int``: per-token dynamic asymmetric INT; ``--abits 8 --aformat fp8``: per-token
dynamic E4M3) are configured in the tool so that its calibration sees them; they are NOT saved (a plain HF folder has
no activation quantizers): the caller re-applies per-token activation quantization at evaluation.

usage: peer_run.py --tool {autoround,llmc-gptq,llmc-awq} --model DIR --calib FILE.jsonl --out DIR --wbits N
                   [--group-size G] [--wformat int|fp4] [--sym] [--abits 16] [--aformat int|fp8] [--iters 200]
                   [--all-layers] [--tokenizer DIR] [--nsamples 32] [--seqlen 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

log = logging.getLogger("peer_run")
TOOLS = ("autoround", "llmc-gptq", "llmc-awq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tool", choices=TOOLS, required=True)
    p.add_argument("--model", required=True, help="Hugging Face model folder (fp32 LLaMA fixture)")
    p.add_argument("--calib", required=True, help="pre-tokenized .jsonl (input_ids per line)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--tokenizer", default=None,
                   help="folder of a tokenizer object the tools require (never used to tokenize; default --model)")
    p.add_argument("--wbits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=None, help="default: per output channel")
    p.add_argument("--wformat", choices=["int", "fp4"], default="int")
    p.add_argument("--sym", action="store_true", help="symmetric INT weights (default asymmetric)")
    p.add_argument("--abits", type=int, default=16)
    p.add_argument("--aformat", choices=["int", "fp8"], default="int")
    p.add_argument("--iters", type=int, default=200, help="AutoRound steps per block (its default 200)")
    p.add_argument("--all-layers", action="store_true",
                   help="AutoRound: quantize linears whose shape is not a multiple of 32 too (monkeypatch)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.wformat == "fp4" and (args.wbits != 4 or args.group_size not in (None, 32)):
        p.error("--wformat fp4 means 4-bit weights with groups of 32 (MXFP4); drop --wbits/--group-size")
    if args.wformat == "fp4":
        args.group_size = 32
    if args.abits < 16 and (args.abits, args.aformat) not in ((4, "int"), (8, "int"), (8, "fp8")):
        p.error(f"activation setting {args.abits}-bit {args.aformat} is not supported here")
    if Path(args.out).exists():
        p.error(f"output folder {args.out} already exists")
    return args


# ---- data ---------------------------------------------------------------------------------------------------
def calib_tokens(path: str, nsamples: int, seqlen: int) -> torch.Tensor:
    """The first ``nsamples`` lines' first ``seqlen`` ids, in file order: ``(nsamples, seqlen)`` int64."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if len(rows) == nsamples:
                break
            if not line.strip():
                continue
            ids = json.loads(line)["input_ids"]
            if len(ids) < seqlen:
                sys.exit(f"peer_run: error: {path} line {number} has {len(ids)} ids < --seqlen {seqlen}")
            rows.append(ids[:seqlen])
    if len(rows) < nsamples:
        sys.exit(f"peer_run: error: {path} has {len(rows)} lines < --nsamples {nsamples}")
    return torch.tensor(rows, dtype=torch.long)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---- helpers ------------------------------------------------------------------------------------------------
def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def linear_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight of block linear ``name``, also when the tool left a wrapper around it (``.orig_layer``)."""
    module = model.get_submodule(name)
    return getattr(module, "orig_layer", module).weight.detach()


def max_levels(w: torch.Tensor, group: int | None) -> int:
    """Largest number of distinct values in one row-group of ``w (out, in)`` (ragged last group included)."""
    g = w.shape[1] if group is None else group
    most = 0
    for start in range(0, w.shape[1], g):
        chunk = w[:, start : start + g]
        most = max(most, max(int(torch.unique(row).numel()) for row in chunk))
    return most


# ---- AutoRound ----------------------------------------------------------------------------------------------
def quantize_every_linear_in_autoround(restored: list[str]) -> None:
    """Undo AutoRound's shape rule (INT weight-only: shape % 32; MX/NV-FP: in_features % group -> 16 bits).

    Wraps ``apply_layer_config_special_cases``: every block layer that the rule added to the layer config (not
    given by us) gets the default scheme back, exactly as the untouched layers get it. Names go to ``restored``.
    """
    from auto_round.compressors import layer_config_resolver as lcr

    original = lcr.apply_layer_config_special_cases

    def patched(layer_config, model, default_dict, *args, **kwargs):
        before = set(layer_config)
        out = original(layer_config, model, default_dict, *args, **kwargs)
        resolved = out[0]
        for name in list(resolved):
            cfg = resolved[name]
            if (name not in before and cfg.get("in_blocks") and cfg.get("fixed_by_user")
                    and cfg.get("bits", 16) >= 16):
                fresh = copy.deepcopy(default_dict)
                fresh.update(fixed_by_user=False, in_blocks=True)
                resolved[name] = fresh
                restored.append(name)
        return out

    lcr.apply_layer_config_special_cases = patched


def run_autoround(model, tokenizer, calib: torch.Tensor, args) -> tuple[float, float, list[str]]:
    from auto_round import AutoRound, SignRoundConfig

    notes = []
    fields = dict(bits=args.wbits, group_size=args.group_size or -1, sym=bool(args.sym), data_type="int")
    if args.wformat == "fp4":
        fields.update(data_type="mx_fp", sym=True, group_size=32)
    if args.abits < 16:
        fp8 = args.aformat == "fp8"
        fields.update(act_bits=args.abits, act_data_type="fp" if fp8 else "int", act_dynamic=True,
                      act_group_size=-1, act_sym=fp8)  # -1 on activations = one scale per token
    restored: list[str] = []
    if args.all_layers:
        quantize_every_linear_in_autoround(restored)
    config = SignRoundConfig(iters=args.iters, **fields)
    data = [row.unsqueeze(0) for row in calib]  # pre-tokenized: a list of (1, seqlen) id tensors, in file order
    t0, c0 = time.perf_counter(), time.process_time()
    ar = AutoRound(model, tokenizer, alg_configs=config, dataset=data, nsamples=args.nsamples, seqlen=args.seqlen,
                   batch_size=min(8, args.nsamples), device_map="cpu", amp=False, low_gpu_mem_usage=False,
                   enable_torch_compile=False)
    ar.quantize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if args.all_layers:
        notes.append(f"monkeypatch restored {len(restored)} linears AutoRound would leave 16-bit")
    return wall, cpu, notes


# ---- llm-compressor -----------------------------------------------------------------------------------------
def llmc_scheme(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC, MXFP4A16

    if args.wformat == "fp4":
        weights = MXFP4A16["weights"].model_copy()
    else:
        weights = QuantizationArgs(num_bits=args.wbits, type="int", symmetric=bool(args.sym),
                                   strategy="group" if args.group_size else "channel", group_size=args.group_size)
    acts = None
    if args.abits < 16:
        if args.aformat == "fp8":
            acts = FP8_DYNAMIC["input_activations"].model_copy()  # E4M3, dynamic, per token
        else:
            acts = QuantizationArgs(num_bits=args.abits, type="int", symmetric=False, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def run_llmc(model, tokenizer, calib: torch.Tensor, args) -> tuple[float, float, list[str]]:
    from datasets import Dataset
    from llmcompressor import oneshot

    notes = []
    ignore = ["lm_head"]
    if args.group_size:
        ragged = [n for n, m in block_linears(model).items() if m.in_features % args.group_size]
        if ragged:
            ignore += ragged
            notes.append(f"{len(ragged)} linears with in_features % {args.group_size} != 0 ignored (llm-compressor "
                         "refuses ragged groups; bypass_divisibility_checks=True crashes in its observer)")
    scheme = llmc_scheme(args)
    if args.tool == "llmc-gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)]
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        mappings = awq_mappings(model, ignore[1:], notes)
        recipe = [AWQModifier(mappings=mappings),
                  QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)]
        if not torch.accelerator.is_available():  # AWQ pins its cache for host-to-device copies: fails on CPU-only
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *a, **k: None
            notes.append("IntermediatesCache.pin_memory made a no-op (llm-compressor's AWQ calls it unconditionally "
                         "and CPU-only torch refuses pinned memory)")
    rows = calib.tolist()
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, max_seq_length=args.seqlen,
            num_calibration_samples=args.nsamples, shuffle_calibration_samples=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    materialize_llmc(model)
    return wall, cpu, notes


def awq_mappings(model, ignored: list[str], notes: list[str]):
    """llm-compressor's own AWQ mappings for the model, less those whose balance layers are all ignored.

    Its AWQ divides by zero (``_compute_layer_means``) on a mapping whose every balance layer has no quantization
    scheme, e.g. ``up_proj -> down_proj`` once the ragged ``down_proj`` is ignored."""
    import re

    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

    names = list(block_linears(model))

    def only_ignored(pattern: str) -> bool:
        rx = re.compile(pattern[3:]) if pattern.startswith("re:") else None
        hits = [n for n in names if (rx.match(n) if rx else n == pattern)]
        return bool(hits) and all(n in ignored for n in hits)

    kept = []
    for m in get_layer_mappings_from_model(model):
        if ignored and all(only_ignored(b) for b in m.balance_layers):
            notes.append(f"AWQ mapping {m.smooth_layer} -> {m.balance_layers} dropped (its layers are ignored)")
        else:
            kept.append(m)
    return kept


@torch.no_grad()
def materialize_llmc(model) -> None:
    """Write into each quantized linear the weight its forward pass uses (fake-quantized with its scales).

    GPTQ already stores quantized-dequantized weights (a no-op then); after AWQ + QuantizationModifier the stored
    weight is the smoothed full-precision one and the quantization happens in the forward hook."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            module.weight.data.copy_(forward_quantize(module, module.weight.data, "weight", scheme.weights))


# ---- main ---------------------------------------------------------------------------------------------------
def save_fake_quantized(qmodel, model_dir: str, out: Path) -> None:
    """A fresh copy of the original model with every parameter/buffer the tool changed copied in; fp32."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    source = {**dict(qmodel.named_buffers()), **dict(qmodel.named_parameters())}
    source = {n.replace(".orig_layer.", "."): t for n, t in source.items()}  # AutoRound's activation wrappers
    with torch.no_grad():
        for name, tensor in fresh.state_dict().items():
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name].detach().to(torch.float32))
    fresh.save_pretrained(out)


@torch.no_grad()
def saved_logits_diff(qmodel, out: Path, ids: torch.Tensor) -> float:
    """Max |logit difference| between the tool's quantized model and the saved folder (weight-only settings)."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    qmodel.eval()
    return float((qmodel(input_ids=ids).logits - saved(input_ids=ids).logits).abs().max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="peer_run: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = calib_tokens(args.calib, args.nsamples, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    before = {n: m.weight.detach().clone() for n, m in block_linears(model).items()}
    runner = run_autoround if args.tool == "autoround" else run_llmc
    wall, cpu, notes = runner(model, tokenizer, calib, args)
    after = {n: linear_weight(model, n) for n in before}
    quantized = [n for n in before if not torch.equal(before[n], after[n])]
    left = [n for n in before if n not in quantized]
    levels = {n: max_levels(after[n].float(), args.group_size) for n in quantized}
    out = Path(args.out)
    save_fake_quantized(model, args.model, out)
    check = saved_logits_diff(model, out, calib[:2]) if args.abits >= 16 else None
    versions = {k: version(k) for k in ("torch", "transformers", "auto-round", "llmcompressor", "compressed-tensors")}
    body = {"tool": args.tool, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "iters": args.iters if args.tool == "autoround" else None,
            "all_layers": bool(args.all_layers), "calib_sha256": tensor_sha256(calib),
            "calib_shape": list(calib.shape), "quantized": quantized, "left_16bit": left,
            "max_levels": max(levels.values(), default=0),
            "saved_vs_tool_logits_max_abs_diff": check, "threads": args.threads,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "versions": versions, "notes": notes,
            "argv": sys.argv[1:] if argv is None else argv}
    (out / "peer_run.json").write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
