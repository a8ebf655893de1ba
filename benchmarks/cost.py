"""Cost table: calibration wall time and peak memory per method and setting.

Run by hand (not by CI), from the project root, e.g.::

    python benchmarks/cost.py --threads 1 --json /tmp/cost.json > /tmp/cost.md            # CPU, fixture models
    python benchmarks/cost.py --gpu --json /tmp/cost-7b.json > /tmp/cost-7b.md              # one 7B-shaped block
    python benchmarks/cost.py --gpu --smoke                                                 # check the --gpu path on CPU

Every row (model × method × setting) runs in a **fresh subprocess**, so its peak memory is its own: the process's
peak resident set size (host) and peak accelerator allocation, as recorded by ``quantize_model``'s memory meter
(``result.memory``; ``ru_maxrss`` where that is missing). "baseline" is the RSS just before ``quantize_model``
(Python, torch, the loaded model and the calibration ids), so ``peak − baseline`` is what calibration itself adds.
Wall time is ``quantize_model``'s (block-input capture + every block), with ``torch.set_num_threads(--threads)``;
"CPU" is the process CPU time over the same call (``time.process_time``), which other processes competing for the
cores inflate much less than the wall time.

CPU mode: the fixture models in ``<shared>/models`` (aidreams260K, stories260K), calibrated on ``--nsamples`` ×
``--seqlen`` windows of ``<shared>/data/<model>-samples`` ``valid`` (seed 0); INT weights in groups of 32.

``--gpu`` mode: one LLaMA-7B-shaped decoder block with random weights (hidden 4096, FFN 11008, 32 heads, fp16,
``LlamaForCausalLM`` with one layer, vocab 32000) calibrated on random token ids (``--nsamples`` × ``--seqlen``,
default 128 × 2048 as in the GPTQ/OmniQuant papers), on the accelerator; INT weights in groups of 128. The time
for a real 7B is an **extrapolation**: ``capture + 32 × block`` seconds, each scaled linearly by ``128 / nsamples``
and, for OmniQuant, by ``20 / --epochs`` (training dominates; its fixed per-block set-up makes this an upper bound).
Peak accelerator memory of one block is what a 32-block run needs too (the walker holds one block and its
calibration activations at a time); the fp16 model itself (13.5 GB) sits in host memory. Refuses without an
accelerator, except ``--smoke`` (a small block on the CPU, to check the script).

Writes a markdown table to stdout, progress to stderr, and (``--json``) the raw per-row results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("aidreams260K", "stories260K")
SEVEN_B = {"hidden": 4096, "ffn": 11008, "heads": 32, "vocab": 32000, "blocks": 32}
SMOKE = {"hidden": 128, "ffn": 344, "heads": 4, "vocab": 512, "blocks": 32}
PAPER_SAMPLES, PAPER_EPOCHS = 128, 20
TAG = "COST_RESULT "


@dataclass(frozen=True)
class Row:
    key: str
    method: str
    setting: str  # {g} is replaced by the INT group size of the mode
    wbits: int | None = 4
    wformat: str = "int"
    group: bool = True  # weight groups (else per channel)
    scale_constraint: str = "none"
    abits: int | None = None
    aformat: str = "int"
    omni: dict = field(default_factory=dict)
    lorc_rank: int = 0
    lorc_bits: int | None = None


ROWS = (
    Row("rtn-w4", "rtn", "W4 g{g}"),
    Row("gptq-w4", "gptq", "W4 g{g}"),
    Row("awq-w4", "awq", "W4 g{g}"),
    Row("omniquant-w4", "omniquant", "W4 g{g}, LWC 20 ep", omni={"lwc": True, "let": False, "epochs": 20}),
    Row("rtn-w4a4", "rtn", "W4A4", group=False, abits=4),
    Row("smoothquant-w4a4", "smoothquant", "W4A4 (α 0.5)", group=False, abits=4),
    Row("omniquant-w4a4", "omniquant", "W4A4, LWC+LET 20 ep, aug", group=False, abits=4,
        omni={"lwc": True, "let": True, "epochs": 20, "aug_loss": True}),
    Row("zqfp-w4a8", "gptq", "ZeroQuant-FP W4A8: FP4 g32 M2 / FP8", wbits=None, wformat="fp4",
        scale_constraint="m2", abits=None, aformat="fp8"),
    Row("zqfp-w4a8-lorc8", "gptq", "ZeroQuant-FP W4A8 + LoRC r8 INT8", wbits=None, wformat="fp4",
        scale_constraint="m2", aformat="fp8", lorc_rank=8, lorc_bits=8),
)
ROW_KEYS = {r.key: r for r in ROWS}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- one row, in its own process -----------------------------------------------------------------------------------
def make_config(row: Row, int_group: int, nsamples: int, seqlen: int, epochs: int | None, calib: str):
    from bitsmith.algorithms.omniquant import OmniQuantConfig
    from bitsmith.config import QuantConfig
    from bitsmith.formats import PerChannel, PerGroup, PerToken, QuantSpec, make_format

    group = 32 if row.wformat != "int" else int_group
    weight = QuantSpec(make_format(row.wformat, bits=row.wbits), PerGroup(group) if row.group else PerChannel(),
                       row.scale_constraint)
    act = None
    if row.abits is not None or row.aformat != "int":
        act = QuantSpec(make_format(row.aformat, bits=row.abits, symmetric=False), PerToken())
    omni = dict(row.omni)
    if epochs is not None and "epochs" in omni:
        omni["epochs"] = epochs
    return QuantConfig(method=row.method, weight=weight, act=act, calib=calib, nsamples=nsamples, seqlen=seqlen,
                       seed=0, options=OmniQuantConfig(**omni) if row.method == "omniquant" else None, lorc_rank=row.lorc_rank, lorc_bits=row.lorc_bits)


def _block_model(shape: dict, seqlen: int, dtype: torch.dtype):
    """A one-layer LlamaForCausalLM of the given shape with random weights (initializer_range 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"], num_hidden_layers=1,
                      vocab_size=shape["vocab"], max_position_embeddings=max(seqlen, 2048), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.config.use_cache = False
    return model


def run_child(spec: dict) -> dict:
    """Quantize one row; returns its timings and memory peaks."""
    from bitsmith.models import get_architecture, load_model
    from bitsmith.pipeline import quantize_model
    from bitsmith.utils.device import default_dtype, resolve_device
    from bitsmith.utils.memory import rss_bytes

    torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    if spec["target"] in MODELS:
        from bitsmith.data import calibration_samples

        shared = Path(spec["shared"])
        model, tokenizer = load_model(shared / "models" / spec["target"], device=device)
        data = shared / "data" / f"{spec['target']}-samples"
        calib = calibration_samples(data, tokenizer, spec["nsamples"], spec["seqlen"], seed=0, split="valid")
        calib_name, int_group = str(data), 32
    else:
        shape = SEVEN_B if spec["target"] == "llama7b-block" else SMOKE
        model = _block_model(shape, spec["seqlen"], default_dtype(device))
        calib = torch.randint(0, shape["vocab"], (spec["nsamples"], spec["seqlen"]), generator=torch.Generator()
                              .manual_seed(0))
        calib_name, int_group = "random-ids", 128
    row = ROW_KEYS[spec["row"]]
    config = make_config(row, int_group, spec["nsamples"], spec["seqlen"], spec.get("epochs"), calib_name)
    arch = get_architecture(model)
    baseline, cpu0 = rss_bytes(), time.process_time()
    result = quantize_model(model, arch, config, calib, device, progress=False)
    cpu_seconds = time.process_time() - cpu0
    mem = dict(getattr(result, "memory", {}) or {})
    peak_rss = mem.get("peak_rss_mb") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    block_s = [b["seconds"] for b in result.blocks]
    return {"row": row.key, "method": row.method, "setting": row.setting.format(g=int_group), "label": config.label,
            "target": spec["target"], "nsamples": spec["nsamples"], "seqlen": spec["seqlen"],
            "epochs": config.options.epochs if row.method == "omniquant" else None,
            "seconds": result.seconds, "cpu_seconds": cpu_seconds, "block_seconds": block_s, "capture_seconds": result.seconds - sum(block_s),
            "baseline_rss_mb": baseline / 2**20, "peak_rss_mb": peak_rss,
            "peak_accelerator_mb": mem.get("peak_accelerator_mb"), "threads": torch.get_num_threads(),
            "device": str(device)}


def spawn(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"row {spec['row']} on {spec['target']} failed (exit {proc.returncode}); see stderr")
    return json.loads(lines[-1][len(TAG):])


# ---- tables --------------------------------------------------------------------------------------------------------
def cpu_table(rows: list[dict]) -> str:
    head = ("| model | method | setting | calib | wall (s) | CPU (s) | wall per block (s) | peak RSS (MB) "
            "| baseline (MB) | peak − baseline (MB) |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_block = sum(r["block_seconds"]) / max(len(r["block_seconds"]), 1)
        lines.append(f"| {r['target']} | {r['method']} | {r['setting']} | {r['nsamples']}×{r['seqlen']} "
                     f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {per_block:.2f} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} "
                     f"| {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} |")
    return "\n".join(lines)


def projection(r: dict, blocks: int) -> float:
    """Projected seconds for ``blocks`` blocks at the papers' 128 samples (and 20 OmniQuant epochs)."""
    scale = PAPER_SAMPLES / r["nsamples"]
    if r["epochs"]:
        scale_block = scale * PAPER_EPOCHS / r["epochs"]
    else:
        scale_block = scale
    return r["capture_seconds"] * scale + blocks * sum(r["block_seconds"]) * scale_block


def gpu_table(rows: list[dict], blocks: int, what: str = "7B") -> str:
    lines = ["| method | setting | measured calib | epochs | 1 block (s) | peak accel. (MB) | peak RSS (MB) "
             f"| projected {what}, {blocks} blocks, {PAPER_SAMPLES} samples (extrapolated) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = projection(r, blocks)
        accel = "–" if r["peak_accelerator_mb"] is None else f"{r['peak_accelerator_mb']:.0f}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['nsamples']}×{r['seqlen']} | {r['epochs'] or '–'} "
                     f"| {sum(r['block_seconds']):.1f} | {accel} | {r['peak_rss_mb']:.0f} "
                     f"| {p / 60:.1f} min ({p / 3600:.2f} h) |")
    return "\n".join(lines)


# ---- driver --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="fixture folder holding models/ and data/ (default: ../shared next to the project)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=list(ROW_KEYS), metavar="ROW",
                   help=f"subset of rows: {', '.join(ROW_KEYS)} (default: all)")
    p.add_argument("--gpu", action="store_true", help="one LLaMA-7B-shaped random block on the accelerator")
    p.add_argument("--smoke", action="store_true", help="with --gpu: a small block on the CPU (checks the script)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 128 CPU, 2048 --gpu)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override OmniQuant's 20 epochs (--gpu projects linearly back to 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per row (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and not args.gpu:
        p.error("--smoke applies to --gpu")
    args.nsamples = args.nsamples or (8 if args.smoke else 128)
    args.seqlen = args.seqlen or (256 if args.smoke else 2048 if args.gpu else 128)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.child is not None:
        print(TAG + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    from bitsmith.utils.device import accelerator_available

    if args.gpu and not args.smoke and not accelerator_available():
        print("cost.py: error: --gpu needs an accelerator and none is available; run the CPU mode (no --gpu), "
              "or --gpu --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    if args.gpu:
        targets, device = ["smoke-block" if args.smoke else "llama7b-block"], "cpu" if args.smoke else "auto"
    else:
        targets, device = list(args.models), "cpu"
    meta = {"command": " ".join(["python", "benchmarks/cost.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "nsamples": args.nsamples, "seqlen": args.seqlen}
    results, start = [], time.perf_counter()
    for target in targets:
        for key in args.rows:
            spec = {"row": key, "target": target, "device": device, "threads": args.threads, "shared": str(args.shared),
                    "nsamples": args.nsamples, "seqlen": args.seqlen, "epochs": args.epochs}
            r = spawn(spec)
            results.append(r)
            log(f"{target} {key:18s}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                + (f", peak accel {r['peak_accelerator_mb']:.0f} MB" if r["peak_accelerator_mb"] else ""))
    meta["total_seconds"] = time.perf_counter() - start
    blocks = (SMOKE if args.smoke else SEVEN_B)["blocks"]
    print(f"<!-- {json.dumps(meta)} -->")
    what = "smoke shape" if args.smoke else "7B"
    print(gpu_table(results, blocks, what) if args.gpu else cpu_table(results))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
