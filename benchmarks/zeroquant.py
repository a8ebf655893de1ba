"""ZeroQuant-FP table: INT vs FP at W8A8 and W4A8, M1 vs M2 vs unconstrained FP4 scales, LoRC ranks 0/4/8/16.

Run by hand (not by CI), from the project root, e.g.::

    python benchmarks/zeroquant.py --threads 1 --seeds 0 1 2 --json /tmp/zeroquant.json > /tmp/zeroquant.md

Every setting is GPTQ (the paper's base algorithm) with dynamic per-token activation quantization, calibrated on
``<shared>/data/<model>-samples`` valid (``--nsamples`` windows of ``--seqlen`` tokens, one calibration draw per
seed) and evaluated on every window of its test split, plus, for models with a tokenizer, the first
``--ood-windows`` windows of WikiText-2 / PTB test (out of domain: a smoke test). A fresh copy of the fp32 model is
quantized through the public library API (``bitsmith.pipeline.quantize_model``) for every (setting, seed).

Columns: ``bpw`` = stored weight bits per weight (codes + 16-bit scales + zero points + LoRC factors and their
scales, via :class:`bitsmith.nn.PackedLinear`; activations excluded), ``w err`` = mean per-layer relative squared
weight error ``‖W − Ŵ − AB‖²/‖W‖²``, perplexities averaged over seeds with the min–max range of the in-domain
one, ``time`` = mean wall seconds of ``quantize_model`` (LoRC included).

Writes markdown tables to stdout, progress to stderr, and (``--json``) the raw per-seed results.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bitsmith
from bitsmith.config import QuantConfig
from bitsmith.data import calibration_samples, eval_windows, load_tokens
from bitsmith.eval.perplexity import model_forward, perplexity
from bitsmith.formats import E2M1, E4M3, IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import get_architecture, load_model
from bitsmith.nn import PackedLinear
from bitsmith.pipeline import QuantResult, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import git_state, log  # noqa: E402  (sibling benchmark script: small shared helpers)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("aidreams260K", "stories260K")
OOD = ("wikitext2", "ptb")
A_INT8, A_FP8 = QuantSpec(IntFormat(8), PerToken()), QuantSpec(E4M3, PerToken())
W_INT8, W_FP8 = QuantSpec(IntFormat(8), PerChannel()), QuantSpec(E4M3, PerChannel())
W4 = {  # name → weight spec; groups of 32 (the OCP MX block size) for INT4 and FP4 alike
    "INT4 g32 / INT8": (QuantSpec(IntFormat(4), PerGroup(32)), A_INT8),
    "FP4 g32 / FP8": (QuantSpec(E2M1, PerGroup(32)), A_FP8),
    "FP4 g32 M1 / FP8": (QuantSpec(E2M1, PerGroup(32), "m1"), A_FP8),
    "FP4 g32 M2 / FP8": (QuantSpec(E2M1, PerGroup(32), "m2"), A_FP8),
}


@dataclass(frozen=True)
class Setting:
    group: str
    name: str
    weight: QuantSpec
    act: QuantSpec
    lorc_rank: int = 0
    lorc_bits: int | None = None

    @property
    def lorc(self) -> str:
        if not self.lorc_rank:
            return "–"
        return f"r{self.lorc_rank} " + (f"int{self.lorc_bits}" if self.lorc_bits else "fp16")


def settings(ranks: list[int]) -> list[Setting]:
    out = [
        Setting("W8A8", "INT8 / INT8", W_INT8, A_INT8),
        Setting("W8A8", "FP8 / FP8", W_FP8, A_FP8),
        Setting("W8A8", "INT8 / FP8", W_INT8, A_FP8),
        Setting("W8A8", "FP8 / INT8", W_FP8, A_INT8),
        Setting("W8A8", "INT8 / INT8", W_INT8, A_INT8, 8, 8),
        Setting("W8A8", "FP8 / FP8", W_FP8, A_FP8, 8, 8),
    ]
    for name, (w, a) in W4.items():
        out += [Setting("W4A8", name, w, a, r, 8 if r else None) for r in ranks]
        out.append(Setting("W4A8", name, w, a, 8, None))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="fixture folder holding models/ and data/ (default: ../shared next to the project)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of named datasets (wikitext2/, ptb/); default: <shared>/data")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--groups", nargs="+", default=["W8A8", "W4A8"], choices=["W8A8", "W4A8"])
    p.add_argument("--ranks", nargs="+", type=int, default=[0, 4, 8, 16], help="LoRC ranks for W4A8 (INT8 factors)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration draws (default: 0)")
    p.add_argument("--eval-windows", type=int, default=None, help="in-domain test windows to score (default: all)")
    p.add_argument("--ood-windows", type=int, default=40, help="WikiText-2/PTB test windows (0 to skip)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or args.shared / "data"
    return args


def weight_bpw(result: QuantResult) -> float:
    """Stored bits per weight over all quantized linears, LoRC factors included (16-bit scales)."""
    bits = n = 0
    for name, qt in result.frozen.items():
        packed = PackedLinear(qt, None)
        factors = result.lorc.get(name)
        if factors is not None:
            packed.set_lorc(factors.a, factors.b)
        bits += packed.storage_bits(scale_bits=16)
        n += qt.codes.numel()
    return bits / n


def mean_weight_err(result: QuantResult) -> float:
    errs = [s.get("lorc_rel_err", s["weight_rel_err"]) for b in result.blocks for s in b["layers"].values()]
    return sum(errs) / len(errs)


def run_model(name: str, args: argparse.Namespace) -> dict:
    model_dir = args.shared / "models" / name
    data = args.shared / "data" / f"{name}-samples"
    base, tokenizer = load_model(model_dir)
    arch = get_architecture(base)
    evals = {"test": eval_windows(load_tokens(data, "test", tokenizer=tokenizer), args.seqlen, args.eval_windows)}
    if tokenizer is not None and args.ood_windows > 0:
        for ds in OOD:
            toks = load_tokens(ds, "test", tokenizer=tokenizer, data_dir=args.data_dir)
            evals[ds] = eval_windows(toks, args.seqlen, args.ood_windows)
    fp32 = {k: perplexity(model_forward(base), w) for k, w in evals.items()}
    log(f"{name} fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in fp32.items()))
    calibs = {s: calibration_samples(data, tokenizer, args.nsamples, args.seqlen, seed=s, split="valid")
              for s in args.seeds}
    out = {"model": name, "fp32": fp32, "eval_windows": {k: list(v.shape) for k, v in evals.items()}, "runs": []}
    for st in settings(args.ranks):
        if st.group not in args.groups:
            continue
        for seed, calib in calibs.items():
            model = copy.deepcopy(base)
            cfg = QuantConfig(method="gptq", weight=st.weight, act=st.act, calib=str(data), nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=seed, lorc_rank=st.lorc_rank, lorc_bits=st.lorc_bits)
            torch.manual_seed(seed)
            result = quantize_model(model, arch, cfg, calib, torch.device("cpu"), progress=False)
            t0 = time.perf_counter()
            scores = {k: perplexity(model_forward(model), w) for k, w in evals.items()}
            run = {"group": st.group, "setting": st.name, "lorc": st.lorc, "seed": seed, "label": cfg.label,
                   "recipe": cfg.to_dict(), "ppl": scores, "bpw": weight_bpw(result),
                   "weight_err": mean_weight_err(result), "calib_seconds": result.seconds,
                   "eval_seconds": time.perf_counter() - t0,
                   "output_mse": [b["output_mse"] for b in result.blocks]}
            out["runs"].append(run)
            log(f"{name} {st.group} {st.name:18s} {st.lorc:10s} seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                + f"  bpw {run['bpw']:.2f}  ({result.seconds:.1f}s)")
            del model
    return out


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def table(res: dict) -> str:
    evals = list(res["fp32"])
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for r in res["runs"]:
        rows.setdefault((r["group"], r["setting"], r["lorc"]), []).append(r)
    seeds = max(len(v) for v in rows.values())
    cols = ["weights / acts", "LoRC", "bpw", "w err", evals[0]] + (["range"] if seeds > 1 else [])
    cols += evals[1:] + ["time (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(cols) - 2)) + "|"]
    fp = ["fp32", "–", "32", "0", fmt(res["fp32"][evals[0]])] + (["" ] if seeds > 1 else [])
    lines.append("| " + " | ".join(fp + [fmt(res["fp32"][e]) for e in evals[1:]] + [""]) + " |")
    for (group, setting, lorc), runs in rows.items():
        mean = {e: statistics.fmean(r["ppl"][e] for r in runs) for e in evals}
        test = [r["ppl"][evals[0]] for r in runs]
        row = [f"{group} {setting}", lorc, f"{runs[0]['bpw']:.2f}",
               f"{statistics.fmean(r['weight_err'] for r in runs):.2e}", fmt(mean[evals[0]])]
        if seeds > 1:
            row.append(f"{fmt(min(test))}–{fmt(max(test))}")
        row += [fmt(mean[e]) for e in evals[1:]] + [f"{statistics.fmean(r['calib_seconds'] for r in runs):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    meta = {"command": " ".join(["python", *sys.argv] if argv is None else ["zeroquant.main", *argv]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "bitsmith": getattr(bitsmith, "__version__", "?"),
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seeds": args.seeds, "git": git_state()}
    start = time.perf_counter()
    results = [run_model(name, args) for name in args.models]
    meta["total_seconds"] = time.perf_counter() - start
    print(f"<!-- {meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s), nsamples {args.nsamples}, "
          f"seqlen {args.seqlen}, seeds {args.seeds}, total {meta['total_seconds']:.0f}s -->")
    for res in results:
        print(f"\n### {res['model']}\n")
        print(table(res))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    log(f"done in {meta['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
