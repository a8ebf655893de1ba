"""Quality table: RTN vs GPTQ on the real fixture models, INT and FP weight formats.

Run by hand (not by CI), from the project root, e.g.::

    python benchmarks/quality.py --threads 1 --json benchmarks/quality.json > benchmarks/quality.md

For each fixture model (calibrated on ``<shared>/data/<model>-samples`` valid split, evaluated on its test split),
each method and each weight setting, a fresh copy of the fp32 model is quantized through the public library API
(``bitsmith.pipeline.quantize_model``, no CLI subprocess) and its perplexity measured on the in-domain test split
(every 128-token window) and, for models with a tokenizer, on WikiText-2 / PTB test (first ``--ood-windows``
windows; out of domain, a smoke test only). Calibration wall time is what ``quantize_model`` reports.

Writes a markdown table per model to stdout, progress to stderr, and (``--json``) the raw results including
per-block output MSE and per-layer weight errors.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bitsmith
from bitsmith.config import QuantConfig
from bitsmith.data import calibration_samples, eval_windows, load_tokens
from bitsmith.eval.perplexity import model_forward, perplexity
from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, QuantSpec
from bitsmith.models import get_architecture, load_model
from bitsmith.pipeline import quantize_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("aidreams260K", "stories260K")
METHODS = ("rtn", "gptq")
OOD = ("wikitext2", "ptb")


@dataclass(frozen=True)
class Setting:
    key: str  # for --settings
    name: str
    spec: QuantSpec


SETTINGS = (
    Setting("w2g32", "W2 g32", QuantSpec(IntFormat(2), PerGroup(32))),
    Setting("w3", "W3 per-channel", QuantSpec(IntFormat(3), PerChannel())),
    Setting("w3g32", "W3 g32", QuantSpec(IntFormat(3), PerGroup(32))),
    Setting("w3g16", "W3 g16", QuantSpec(IntFormat(3), PerGroup(16))),
    Setting("w4", "W4 per-channel", QuantSpec(IntFormat(4), PerChannel())),
    Setting("w4g32", "W4 g32", QuantSpec(IntFormat(4), PerGroup(32))),
    Setting("w8", "W8 per-channel", QuantSpec(IntFormat(8), PerChannel())),
    Setting("fp4g32", "W4 fp4(e2m1) g32", QuantSpec(E2M1, PerGroup(32))),
    Setting("fp8", "W8 fp8(e4m3) per-channel", QuantSpec(E4M3, PerChannel())),
)
SETTING_KEYS = {s.key: s for s in SETTINGS}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="fixture folder holding models/ and data/ (default: ../shared next to the project)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of named datasets (wikitext2/, ptb/); default: <shared>/data")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--settings", nargs="+", default=None, metavar="KEY",
                   help=f"subset of settings by key: {', '.join(SETTING_KEYS)} (default: all)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=None,
                   help="in-domain test windows to score (default: all)")
    p.add_argument("--ood-windows", type=int, default=40, help="WikiText-2/PTB test windows (0 to skip)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or args.shared / "data"
    if args.settings is None:
        args.settings = list(SETTING_KEYS)
    unknown = sorted(set(args.settings) - set(SETTING_KEYS))
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTING_KEYS)}")
    return args


def git_state() -> dict:
    """Commit and locally modified library files (read-only git commands)."""
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""
    return {"commit": run("rev-parse", "--short", "HEAD").strip(),
            "dirty_files": [line[3:] for line in run("status", "--porcelain", "--", "src").splitlines() if line]}


def ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return perplexity(model_forward(model), windows)


def evaluate(model: torch.nn.Module, evals: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: ppl(model, w) for name, w in evals.items()}


def run_model(name: str, args: argparse.Namespace) -> dict:
    model_dir = args.shared / "models" / name
    data = args.shared / "data" / f"{name}-samples"
    base, tokenizer = load_model(model_dir)
    arch = get_architecture(base)
    calib = calibration_samples(data, tokenizer, args.nsamples, args.seqlen, seed=args.seed, split="valid")
    evals = {"test": eval_windows(load_tokens(data, "test", tokenizer=tokenizer), args.seqlen, args.eval_windows)}
    if tokenizer is not None and args.ood_windows > 0:
        for ds in OOD:
            toks = load_tokens(ds, "test", tokenizer=tokenizer, data_dir=args.data_dir)
            evals[ds] = eval_windows(toks, args.seqlen, args.ood_windows)
    log(f"{name}: calib {tuple(calib.shape)}, eval " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in evals.items()))
    t0 = time.perf_counter()
    fp32 = evaluate(base, evals)
    log(f"{name} fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in fp32.items())
        + f" ({time.perf_counter() - t0:.1f}s)")
    out = {"model": name, "calib_shape": list(calib.shape),
           "eval_windows": {k: list(v.shape) for k, v in evals.items()}, "fp32": fp32, "runs": []}
    for key in args.settings:
        setting = SETTING_KEYS[key]
        for method in args.methods:
            model = copy.deepcopy(base)
            config = QuantConfig(method=method, weight=setting.spec, calib=str(data), nsamples=args.nsamples,
                                 seqlen=args.seqlen, seed=args.seed)
            result = quantize_model(model, arch, config, calib, torch.device("cpu"), progress=False)
            t1 = time.perf_counter()
            scores = evaluate(model, evals)
            eval_s = time.perf_counter() - t1
            blocks = [{"block": b["block"], "output_mse": b["output_mse"], "seconds": b["seconds"],
                       "layers": b.get("layers", {})} for b in result.blocks]
            out["runs"].append({"setting": setting.name, "key": key, "method": method, "label": config.label,
                                "spec": setting.spec.to_dict(), "ppl": scores, "calib_seconds": result.seconds,
                                "eval_seconds": eval_s, "blocks": blocks})
            log(f"{name} {setting.name:26s} {method:4s}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                + f"  (quant {result.seconds:.1f}s, eval {eval_s:.1f}s)")
            del model
    return out


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2f}" if x < 1000 else f"{x:.0f}"


def table(res: dict, methods: list[str]) -> str:
    evals = list(res["fp32"])
    runs = {(r["setting"], r["method"]): r for r in res["runs"]}
    settings = list(dict.fromkeys(r["setting"] for r in res["runs"]))
    cols = ["setting"]
    for e in evals:
        cols += [f"{m.upper()} {e}" for m in methods]
    cols += [f"{m.upper()} time (s)" for m in methods]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    row = ["fp32"]
    for e in evals:
        row += [fmt(res["fp32"][e])] + [""] * (len(methods) - 1)
    lines.append("| " + " | ".join(row + [""] * len(methods)) + " |")
    for s in settings:
        row = [s]
        for e in evals:
            row += [fmt(runs[(s, m)]["ppl"][e]) if (s, m) in runs else "–" for m in methods]
        row += [f"{runs[(s, m)]['calib_seconds']:.1f}" if (s, m) in runs else "–" for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    meta = {"command": " ".join(["python", *sys.argv] if argv is None else ["quality.main", *argv]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "bitsmith": getattr(bitsmith, "__version__", "?"),
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "git": git_state()}
    start = time.perf_counter()
    results = [run_model(name, args) for name in args.models]
    meta["total_seconds"] = time.perf_counter() - start
    print(f"<!-- {meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s), "
          f"nsamples {args.nsamples}, seqlen {args.seqlen}, seed {args.seed}, total {meta['total_seconds']:.0f}s -->")
    for res in results:
        print(f"\n### {res['model']}\n")
        print(table(res, args.methods))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    log(f"done in {meta['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
