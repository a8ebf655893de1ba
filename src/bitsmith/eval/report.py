"""Run reports (``report.json``, ``report.md``, ``report.png`` beside ``bitsmith.json``) and ``bitsmith compare``.

Storage accounting (computed by the CLI, summed by :func:`size_summary`): every quantized block linear
stores ``in·out`` codes of the weight format's bits, one fp16 scale per group (per row for per-channel, one for
per-tensor; M1/M2 power-of-two scales are counted at 16 bits too, an upper bound), one zero point per group at
the code width for asymmetric integers, and the LoRC factors (``algorithms.lorc.lorc_extra_bits``). Ragged last
groups count as whole groups. Everything else (embeddings, norms, head) counts 16 bits in the size estimate.

matplotlib is optional (``pip install "bitsmith[report]"``): without it the PNGs are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
FLOAT_BITS = 16


# ---- storage accounting ------------------------------------------------------------------------------------
def size_summary(layers: Iterable[tuple[str, int, int]], total_params: int) -> dict[str, Any]:
    """Bits per weight of the quantized linears (overall and per layer) and a model size estimate.

    ``layers``: ``(name, n_weights, storage_bits)`` of every block linear (the CLI computes the bits with
    :func:`bitsmith.formats.packing.storage_bits` and LoRC's ``lorc_extra_bits``, see the module docstring);
    ``total_params``: all parameters of the model (the rest are counted at 16 bits).
    """
    per_layer: dict[str, float] = {}
    bits = n_linear = 0
    for name, n, b in layers:
        per_layer[name] = b / n
        bits += b
        n_linear += n
    other = max(total_params - n_linear, 0)
    est_bytes = math.ceil((bits + other * FLOAT_BITS) / 8)
    fp16_bytes = total_params * 2
    return {
        "bits_per_weight": bits / n_linear if n_linear else float(FLOAT_BITS),
        "layer_bits_per_weight": per_layer,
        "size": {
            "quantized_params": n_linear, "other_params": other, "estimated_bytes": est_bytes,
            "fp16_bytes": fp16_bytes, "compression_vs_fp16": round(fp16_bytes / max(est_bytes, 1), 4),
        },
    }


def peak_memory_mb(blocks: Sequence[dict]) -> float:
    return max((float(b.get("peak_memory_mb", 0.0)) for b in blocks), default=0.0)


# ---- writing a run's report ------------------------------------------------------------------------------------
def write_reports(folder: str | Path, body: dict[str, Any]) -> None:
    """Write ``report.json`` (``body`` plus derived totals), ``report.md`` and (with matplotlib) ``report.png``."""
    folder = Path(folder)
    blocks = body.get("blocks", [])
    full = {**body, "peak_memory_mb": round(peak_memory_mb(blocks), 3), "n_blocks": len(blocks)}
    (folder / REPORT_JSON).write_text(json.dumps(full, indent=2) + "\n")
    (folder / REPORT_MD).write_text(render_markdown(full))
    plt = _pyplot()
    if plt is None:
        log.warning("matplotlib is not installed; skipping %s (pip install \"bitsmith[report]\")", REPORT_PNG)
        return
    plot_blocks(full, folder / REPORT_PNG, plt)


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def render_markdown(report: dict[str, Any]) -> str:
    recipe = report.get("recipe", {})
    blocks = report.get("blocks", [])
    w = recipe.get("weight")
    lines = [f"# bitsmith report: {report.get('label', '?')}", "",
             f"- method: `{recipe.get('method', '?')}`",
             f"- weights: `{json.dumps(w) if w else 'fp16 (not quantized)'}`",
             f"- activations: `{json.dumps(recipe.get('act')) if recipe.get('act') else 'not quantized'}`",
             f"- KV cache: `{json.dumps(recipe.get('kv')) if recipe.get('kv') else 'not quantized'}`"]
    if recipe.get("lorc_rank"):
        lines.append(f"- LoRC: rank {recipe['lorc_rank']}, factor bits {recipe.get('lorc_bits') or 16}")
    lines += [f"- calibration: `{recipe.get('calib')}`, {recipe.get('nsamples')} × {recipe.get('seqlen')} tokens",
              f"- source model: `{report.get('source_model', '?')}`",
              f"- bits per weight: {_fmt(report.get('bits_per_weight'))}"]
    size = report.get("size")
    if size:
        lines.append(f"- estimated size: {size['estimated_bytes'] / 2**20:.3f} MiB "
                     f"(fp16 {size['fp16_bytes'] / 2**20:.3f} MiB, ×{size['compression_vs_fp16']:.2f})")
    lines.append(f"- time: {_fmt(report.get('seconds'), '.1f')} s quantizing, "
                 f"{_fmt(report.get('total_seconds'), '.1f')} s in all; "
                 f"peak memory {_fmt(report.get('peak_memory_mb'), '.0f')} MB")
    for name, v in (report.get("ppl") or {}).items():
        lines.append(f"- perplexity `{name}`: {v:.4f}")
    trained = any("loss_final" in b for b in blocks)
    head = ["block", "output MSE", "mean weight rel. err"] + (["loss init", "loss final"] if trained else []) + \
        ["seconds", "peak MB"]
    lines += ["", "## Blocks", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in blocks:
        errs = [s.get("weight_rel_err") for s in b.get("layers", {}).values() if s.get("weight_rel_err") is not None]
        row = [str(b.get("block")), _fmt(b.get("output_mse")), _fmt(sum(errs) / len(errs) if errs else None)]
        if trained:
            row += [_fmt(b.get("loss_init")), _fmt(b.get("loss_final"))]
        row += [_fmt(b.get("seconds"), ".2f"), _fmt(b.get("peak_memory_mb"), ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + _expert_lines(blocks)) + "\n"


def _expert_lines(blocks: Sequence[dict]) -> list[str]:
    """Mixture of experts: calibration tokens per expert and which experts were rounded to nearest, per block."""
    moe = [(b.get("block"), b["experts"]) for b in blocks if b.get("experts")]
    if not moe:
        return []
    lines = ["", "## Experts", "", f"Policy: {moe[0][1].get('policy')}.", "",
             "| block | calibration tokens per expert | rounded to nearest |", "|---|---|---|"]
    for index, e in moe:
        lines.append(f"| {index} | {', '.join(str(t) for t in e.get('tokens', []))} | "
                     f"{', '.join(str(x) for x in e.get('rtn', [])) or 'none'} |")
    return lines


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_blocks(report: dict[str, Any], path: str | Path, plt) -> None:
    """Per-block output MSE (log y), plus reconstruction loss before/after training when present."""
    blocks = report.get("blocks", [])
    x = [b["block"] for b in blocks]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        ax.plot(x, [b.get("output_mse", float("nan")) for b in blocks], "o-", label="output MSE vs fp block")
        if any("loss_init" in b for b in blocks):
            ax.plot(x, [b.get("loss_init", float("nan")) for b in blocks], "s--", label="reconstruction loss (before)")
            ax.plot(x, [b.get("loss_final", float("nan")) for b in blocks], "^--", label="reconstruction loss (after)")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("MSE (log scale)")
        ax.set_xticks(x)
        ax.grid(True, which="both", alpha=0.3)
        method = report.get("recipe", {}).get("method", "")
        ax.set_title(f"{report.get('label', '?')} ({method}): per-block error")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# ---- bitsmith compare -------------------------------------------------------------------------------------------
def load_run(folder: str | Path) -> dict[str, Any]:
    """A run's ``report.json`` (or the ``bitsmith.json`` of an older run); ValueError naming the folder if none."""
    folder = Path(folder)
    for name in (REPORT_JSON, "bitsmith.json"):
        p = folder / name
        if p.is_file():
            try:
                body = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{p} is corrupt ({e}); re-run bitsmith quantize to recreate it") from None
            body.setdefault("peak_memory_mb", peak_memory_mb(body.get("blocks", [])))
            body["run"] = str(folder)
            return body
    if not folder.is_dir():
        raise DataError(f"run folder {folder} does not exist")
    raise DataError(f"{folder} has no {REPORT_JSON} or bitsmith.json; pass folders written by bitsmith quantize")


def _pick_dataset(runs: list[dict], dataset: str | None) -> str | None:
    names = [n for r in runs for n in (r.get("ppl") or {})]
    if dataset is None:
        return names[0] if names else None
    for n in names:
        if n == dataset or Path(n).name == dataset or Path(n).stem == dataset:
            return n
    raise DataError(f"no run has a perplexity for dataset {dataset!r}; datasets: {sorted(set(names)) or 'none'}")


def compare_table(runs: list[dict]) -> str:
    datasets = list(dict.fromkeys(n for r in runs for n in (r.get("ppl") or {})))
    head = ["run", "label", "method", "bits/w"] + [f"ppl {Path(d).name}" for d in datasets] + ["seconds", "peak MB"]
    rows = [head]
    for r in runs:
        ppl = r.get("ppl") or {}
        rows.append([Path(r["run"]).name, str(r.get("label", "?")), str(r.get("recipe", {}).get("method", "?")),
                     _fmt(r.get("bits_per_weight"), ".4g")] + [_fmt(ppl.get(d), ".4f") for d in datasets]
                    + [_fmt(r.get("seconds"), ".1f"), _fmt(r.get("peak_memory_mb"), ".0f")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def plot_compare(runs: list[dict], dataset: str, path: str | Path, plt) -> tuple[int, str]:
    """PPL vs bits per weight, one labelled point per run (log y above a 10× PPL range).

    Returns the number of points drawn and the y scale (``linear`` or ``log``)."""
    pts = [(r["bits_per_weight"], r["ppl"][dataset], f"{r.get('recipe', {}).get('method', '?')} {r.get('label', '')}")
           for r in runs if r.get("bits_per_weight") is not None and dataset in (r.get("ppl") or {})]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        for bpw, ppl, label in pts:
            ax.scatter([bpw], [ppl], s=40)
            ax.annotate(label, (bpw, ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ys = [p for _, p, _ in pts if p > 0]
        if ys and max(ys) / min(ys) > 10:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(f"perplexity ({Path(dataset).name})" + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.set_title(f"bitsmith compare: perplexity vs bits per weight on {Path(dataset).name}")
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        fig.tight_layout()
        fig.savefig(path, format="png")
        yscale = ax.get_yscale()
    finally:
        plt.close(fig)
    return len(pts), yscale


def compare(folders: Sequence[str | Path], output: str | Path | None = None, dataset: str | None = None) -> str:
    """Load every run (ValueError for a folder without a report), write the scatter plot to ``output`` (needs
    matplotlib) and return the table text."""
    runs = [load_run(f) for f in folders]
    chosen = _pick_dataset(runs, dataset)
    if output is not None:
        plt = _pyplot()
        if plt is None:
            raise ConfigError("--output needs matplotlib: pip install \"bitsmith[report]\"")
        if chosen is None:
            log.warning("no run has a perplexity; not writing %s (quantize with --ppl)", output)
        else:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            n, yscale = plot_compare(runs, chosen, output, plt)
            log.info("wrote %s (%d runs on %s, %s y axis)", output, n, chosen, yscale)
    return compare_table(runs)
