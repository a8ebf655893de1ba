"""OmniQuant table: OmniQuant vs GPTQ / RTN / SmoothQuant, weight-only, weight-activation and KV cache.

Run by hand (not by CI), from the project root, e.g.::

    python benchmarks/omniquant.py --threads 1 --nsamples 64 --json /tmp/omniquant.json > /tmp/omniquant.md

For each fixture model (calibrated on ``<shared>/data/<model>-samples`` valid split, evaluated on every window of
its test split) and each (setting, method) a fresh copy of the fp32 model is quantized through the public library
API (``bitsmith.pipeline.quantize_model``) and its perplexity measured; for models with a tokenizer also on
WikiText-2 / PTB test (first ``--ood-windows`` windows; out of domain, a smoke test only).

Settings and OmniQuant recipes (official LLaMA scripts: LWC only for weight-only, LWC+LET for weight-activation;
W2 and W4A4 add the augmented loss, W2 trains 40 epochs):

* weight-only, activations fp32: W2 g32 (LWC, 40 epochs, aug loss), W3 g32, W3 per-channel, W4 per-channel
  (LWC, 20 epochs) — against RTN and GPTQ;
* weight-activation, per-channel weights and per-token dynamic activations: W4A4 (LWC+LET, 20 epochs, aug loss),
  W6A6 (LWC+LET, 20 epochs) — against RTN and SmoothQuant (alpha 0.5);
* KV cache (post-RoPE keys and values, per token and head): W16A16KV4 (LET only: with full-precision weights
  LWC has nothing to clip), W4A16KV8 with per-channel W4 (LWC+LET) — against RTN.

The same ``--nsamples`` x ``--seqlen`` calibration windows serve every method. Per OmniQuant run the per-block
reconstruction loss before and after training (``loss_init`` / ``loss_final``) is recorded; with the augmented
loss it is the sum of both targets' MSE, so it is comparable only within a recipe.

Writes markdown tables to stdout, progress to stderr, and (``--json``) the raw results (per-block output MSE,
losses and epoch histories).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bitsmith
from bitsmith.algorithms.omniquant import OmniQuantConfig
from bitsmith.algorithms.smoothquant import SmoothQuantConfig
from bitsmith.config import QuantConfig
from bitsmith.data import calibration_samples, eval_windows, load_tokens
from bitsmith.eval.perplexity import model_forward, nll_per_window
from bitsmith.formats import IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import get_architecture, load_model
from bitsmith.pipeline import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import fmt, git_state, log  # noqa: E402  (sibling benchmark script: small shared helpers)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("aidreams260K", "stories260K")
METHODS = ("rtn", "gptq", "smoothquant", "omniquant")
METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "smoothquant": "SmoothQuant", "omniquant": "OmniQuant"}
OOD = ("wikitext2", "ptb")
HEAD = 40  # FIXTURES.md quotes fp32 perplexity over the first 40 test windows


def _w(bits: int, group: int | None = None) -> QuantSpec:
    return QuantSpec(IntFormat(bits), PerGroup(group) if group else PerChannel())


def _tok(bits: int) -> QuantSpec:
    return QuantSpec(IntFormat(bits), PerToken())


@dataclass(frozen=True)
class Setting:
    key: str
    name: str
    kind: str  # "weight-only", "weight-activation", "kv"
    weight: QuantSpec | None
    act: QuantSpec | None
    kv: QuantSpec | None
    methods: tuple[str, ...]
    omni: OmniQuantConfig

    @property
    def recipe(self) -> str:
        return recipe(self.omni)


def recipe(o: OmniQuantConfig) -> str:
    """Short OmniQuant recipe, e.g. ``LWC+LET, 20 ep, aug`` (learning rates only when not the defaults)."""
    parts = [p for p, on in (("LWC", o.lwc), ("LET", o.let)) if on]
    text = "+".join(parts) + f", {o.epochs} ep" + (", aug" if o.aug_loss else "")
    default = OmniQuantConfig()
    if o.lwc and o.lwc_lr != default.lwc_lr:
        text += f", lwc_lr {o.lwc_lr:g}"
    if o.let and o.let_lr != default.let_lr:
        text += f", let_lr {o.let_lr:g}"
    return text


SETTINGS = (
    Setting("w2g32", "W2 g32", "weight-only", _w(2, 32), None, None, ("rtn", "gptq", "omniquant"),
            OmniQuantConfig(lwc=True, let=False, epochs=40, aug_loss=True)),
    Setting("w3g32", "W3 g32", "weight-only", _w(3, 32), None, None, ("rtn", "gptq", "omniquant"),
            OmniQuantConfig(lwc=True, let=False, epochs=20)),
    Setting("w3", "W3 per-channel", "weight-only", _w(3), None, None, ("rtn", "gptq", "omniquant"),
            OmniQuantConfig(lwc=True, let=False, epochs=20)),
    Setting("w4", "W4 per-channel", "weight-only", _w(4), None, None, ("rtn", "gptq", "omniquant"),
            OmniQuantConfig(lwc=True, let=False, epochs=20)),
    Setting("w4a4", "W4A4", "weight-activation", _w(4), _tok(4), None, ("rtn", "smoothquant", "omniquant"),
            OmniQuantConfig(lwc=True, let=True, epochs=20, aug_loss=True)),
    Setting("w6a6", "W6A6", "weight-activation", _w(6), _tok(6), None, ("rtn", "smoothquant", "omniquant"),
            OmniQuantConfig(lwc=True, let=True, epochs=20)),
    Setting("kv4", "W16A16KV4", "kv", None, None, _tok(4), ("rtn", "omniquant"),
            OmniQuantConfig(lwc=False, let=True, epochs=20)),
    Setting("w4kv8", "W4A16KV8", "kv", _w(4), None, _tok(8), ("rtn", "omniquant"),
            OmniQuantConfig(lwc=True, let=True, epochs=20)),
)
SETTING_KEYS = {s.key: s for s in SETTINGS}


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
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows, the same for every method")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--epochs", type=int, default=None, help="override every OmniQuant recipe's epochs")
    p.add_argument("--lwc-lr", type=float, default=None, help="override the LWC learning rate (default 1e-2)")
    p.add_argument("--let-lr", type=float, default=None, help="override the LET learning rate (default 5e-3)")
    p.add_argument("--eval-windows", type=int, default=None, help="in-domain test windows to score (default: all)")
    p.add_argument("--ood-windows", type=int, default=40, help="WikiText-2/PTB test windows (0 to skip)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="print the tables of a saved --json file and exit (no quantization)")
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or args.shared / "data"
    if args.settings is None:
        args.settings = list(SETTING_KEYS)
    unknown = sorted(set(args.settings) - set(SETTING_KEYS))
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTING_KEYS)}")
    return args


def evaluate(model: torch.nn.Module, evals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity per eval set; ``test`` also reports ``test@40`` (its first 40 windows, FIXTURES.md's number)."""
    out = {}
    fwd = model_forward(model)
    for name, w in evals.items():
        nll = nll_per_window(fwd, w)
        out[name] = _exp(float(nll.mean()))
        if name == "test":
            out[f"test@{HEAD}"] = _exp(float(nll[:HEAD].mean()))
    return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _block_stats(b: dict) -> dict:
    keep = ("block", "output_mse", "seconds", "loss_init", "loss_final", "epoch_losses")
    d = {k: b[k] for k in keep if k in b}
    d["layers"] = b.get("layers", {})
    return d


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
    fp32 = evaluate(base, evals)
    log(f"{name} fp32: " + ", ".join(f"{k} {v:.3f}" for k, v in fp32.items()))
    out = {"model": name, "calib_shape": list(calib.shape),
           "eval_windows": {k: list(v.shape) for k, v in evals.items()}, "fp32": fp32, "runs": []}
    for key in args.settings:
        s = SETTING_KEYS[key]
        for method in (m for m in s.methods if m in args.methods):
            model = copy.deepcopy(base)
            over = {k: v for k, v in (("epochs", args.epochs), ("lwc_lr", args.lwc_lr), ("let_lr", args.let_lr))
                    if v is not None}
            config = QuantConfig(method=method, weight=s.weight, act=s.act, kv=s.kv,
                                 options={"omniquant": dataclasses.replace(s.omni, **over),
                                          "smoothquant": SmoothQuantConfig(alpha=args.alpha)}.get(method),
                                 calib=str(data),
                                 nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
            result = quantize_model(model, arch, config, calib, torch.device("cpu"), progress=False)
            t1 = time.perf_counter()
            scores = evaluate(model, evals)
            eval_s = time.perf_counter() - t1
            run = {"setting": s.name, "key": key, "kind": s.kind, "method": method, "label": config.label,
                   "config": config.to_dict(), "ppl": scores, "calib_seconds": result.seconds,
                   "eval_seconds": eval_s, "blocks": [_block_stats(b) for b in result.blocks]}
            out["runs"].append(run)
            extra = ""
            if method == "omniquant":
                extra = "  loss " + ", ".join(f"{b['loss_init']:.3g}→{b['loss_final']:.3g}" for b in result.blocks)
            log(f"{name} {s.name:15s} {method:11s}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                + f"  (quant {result.seconds:.1f}s, eval {eval_s:.1f}s){extra}")
            for w in anomalies(run, fp32):
                log(f"  WARNING {w}")
            del model
    return out


def anomalies(run: dict, fp32: dict[str, float]) -> list[str]:
    """Things that look broken: non-finite perplexity or loss, training that ends above its starting loss."""
    msgs = [f"{k} perplexity {v}" for k, v in run["ppl"].items() if not math.isfinite(v)]
    for b in run["blocks"]:
        if "loss_init" not in b:
            continue
        li, lf = b["loss_init"], b["loss_final"]
        if not (math.isfinite(li) and math.isfinite(lf)):
            msgs.append(f"block {b['block']}: non-finite loss {li} → {lf}")
        elif lf > li:
            msgs.append(f"block {b['block']}: loss rose {li:.6g} → {lf:.6g} (+{100 * (lf / li - 1):.2f} %)")
    return msgs


def _omni_options(config: dict) -> dict:
    """OmniQuant's options from a stored run's recipe (version 2: ``options``; version 1: ``omniquant``)."""
    return config.get("options") if config.get("version", 1) >= 2 else config["omniquant"]


def _find(res: dict, setting: str, method: str) -> dict | None:
    for r in res["runs"]:
        if r["setting"] == setting and r["method"] == method:
            return r
    return None


def ppl_table(res: dict, methods: list[str], evals: list[str], best: bool = True, times: bool = True) -> str:
    """One row per setting: perplexity of each method on each eval set (``best``: the lowest in bold), then
    (``times``) calibration seconds per method."""
    settings = [s for s in SETTINGS if any(r["key"] == s.key for r in res["runs"])]
    used = [m for m in methods if any(r["method"] == m for r in res["runs"])]
    cols = ["setting", "OmniQuant recipe"]
    for e in evals:
        cols += [f"{METHOD_NAMES[m]} {e}" for m in used]
    cols += [f"{METHOD_NAMES[m]} time (s)" for m in used] if times else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(cols) - 2)) + "|"]
    row = ["fp32", ""]
    for e in evals:
        row += [fmt(res["fp32"][e])] + [""] * (len(used) - 1)
    lines.append("| " + " | ".join(row + [""] * (len(used) if times else 0)) + " |")
    for s in settings:
        runs = {m: _find(res, s.name, m) for m in used}
        omni = _find(res, s.name, "omniquant")
        row = [s.name, recipe(OmniQuantConfig(**_omni_options(omni["config"]))) if omni else "–"]
        for e in evals:
            vals = {m: r["ppl"][e] for m, r in runs.items() if r is not None}
            low = min(vals.values()) if vals else None
            for m in used:
                if m not in vals:
                    row.append("–")
                else:
                    cell = fmt(vals[m])
                    row.append(f"**{cell}**" if best and len(vals) > 1 and cell == fmt(low) else cell)
        if times:
            row += [f"{runs[m]['calib_seconds']:.1f}" if runs[m] is not None else "–" for m in used]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _sci(x: float) -> str:
    return f"{x:.3g}"


def loss_table(res: dict) -> str:
    """Per OmniQuant run: block reconstruction loss before → after training and the relative change."""
    runs = [r for r in res["runs"] if r["method"] == "omniquant"]
    if not runs:
        return ""
    nb = max(len(r["blocks"]) for r in runs)
    cols = ["setting (OmniQuant)"] + [f"block {i}: init → final" for i in range(nb)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for r in runs:
        row = [r["setting"]]
        for b in r["blocks"]:
            li, lf = b["loss_init"], b["loss_final"]
            change = 100 * (lf / li - 1) if li else math.nan
            row.append(f"{_sci(li)} → {_sci(lf)} ({change:+.1f} %)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        render(saved["meta"], saved["results"], list(METHODS))
        return 0
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    meta = {"command": " ".join(["python", *sys.argv] if argv is None else ["omniquant.main", *argv]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "bitsmith": getattr(bitsmith, "__version__", "?"),
            "python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "alpha": args.alpha,
            "git": git_state()}
    start = time.perf_counter()
    results = [run_model(name, args) for name in args.models]
    meta["total_seconds"] = time.perf_counter() - start
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    render(meta, results, args.methods)
    log(f"done in {meta['total_seconds']:.0f}s")
    return 0


def render(meta: dict, results: list[dict], methods: list[str]) -> None:
    """Markdown tables of one run (also from a saved ``--json`` file: ``--render FILE``)."""
    print(f"<!-- {meta['date']}, torch {meta['torch']}, {meta['threads']} thread(s), nsamples {meta['nsamples']}, "
          f"seqlen {meta['seqlen']}, seed {meta['seed']}, total {meta['total_seconds']:.0f}s -->")
    for res in results:
        evals = ["test", f"test@{HEAD}"]
        print(f"\n### {res['model']} (fp32 test {fmt(res['fp32']['test'])}, first {HEAD} windows "
              f"{fmt(res['fp32'][f'test@{HEAD}'])})\n")
        print(ppl_table(res, methods, evals))
        ood = [e for e in OOD if e in res["fp32"]]
        if ood:
            ood_n = res["eval_windows"][ood[0]][0]
            print(f"\n{res['model']}, out of domain (first {ood_n} windows; smoke test only, lower is not "
                  "better here):\n")
            print(ppl_table(res, methods, ood, best=False, times=False))
        lt = loss_table(res)
        if lt:
            print(f"\n{res['model']}, OmniQuant block reconstruction loss (MSE) before → after training:\n")
            print(lt)
        warnings = [f"{r['setting']} {r['method']}: {w}" for r in res["runs"] for w in anomalies(r, res["fp32"])]
        if warnings:
            print(f"\n{res['model']} anomalies:\n")
            print("\n".join(f"- {w}" for w in warnings))


if __name__ == "__main__":
    sys.exit(main())
