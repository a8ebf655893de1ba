"""Command line: ``bitsmith quantize`` and ``bitsmith eval``. The only place that parses strings.

Every user error (bad flag combination, missing path, unknown dataset, …) ends with one line on stderr,
``bitsmith: error: …``, and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BitsmithError, UsageError
from ..version import __version__
from . import scale

log = logging.getLogger("bitsmith.cli")


# ---- argument parsing ----------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--data-dir", default=None, help="folder with <dataset>/<split>.txt|.jsonl (env BITSMITH_DATA_DIR)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; use 1 when other processes share the cores)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsmith", description="Post-training quantization of LLMs.")
    parser.add_argument("--version", action="version", version=f"bitsmith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    _eval_parser(sub)
    _export_parsers(sub)
    return parser


def _quantize_parser(sub) -> None:
    from ..algorithms import method_names

    q = sub.add_parser("quantize", help="quantize a local Hugging Face model folder")
    q.add_argument("model", help="local model folder (config.json + safetensors)")
    q.add_argument("--output", "-o", required=True, help="output folder (refused if it exists, see --overwrite)")
    q.add_argument("--recipe", default=None, help="JSON recipe file; explicit flags override its values")
    q.add_argument("--method", choices=method_names(), default=None,
                   help="weight algorithm (default: bitsmith, the default learned recipe)")
    q.add_argument("--wbits", type=int, default=None, help="weight bits (16 = leave weights; default 4)")
    q.add_argument("--abits", type=int, default=None, help="activation bits (default 16 = not quantized)")
    q.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    q.add_argument("--wformat", default=None, help="int (default), fp4/e2m1, fp6/e3m2, e2m3, fp8/e4m3, e5m2, or llama.cpp's "
                        "K-quant grids q4_k, q5_k, q6_k (for GGUF export)")
    q.add_argument("--aformat", default=None, help="activation format: int (default), fp8/e4m3, e5m2, …")
    q.add_argument("--kvbits", type=int, default=None, help="KV-cache bits, per token and head (default 16 = off)")
    q.add_argument("--kvformat", default=None, help="KV-cache format: int (default), fp8/e4m3, …")
    q.add_argument("--sym", action="store_true", default=None, help="symmetric integer weights")
    q.add_argument("--scale-constraint", choices=["none", "m1", "m2"], default=None,
                   help="power-of-two scale constraint for FP weights (ZeroQuant-FP M1/M2)")
    q.add_argument("--calib", default=None, help="wikitext2, ptb, c4, or a .txt/.jsonl file or split folder")
    q.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 2048)")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--calib-order", choices=["random", "file"], default=None,
                   help="calibration windows drawn at random with --seed (default), or the first --nsamples "
                        "lines/windows in file order")
    q.add_argument("--batch-size", type=int, default=None,
                   help="calibration samples per batch / training step (default 1); under torchrun the global "
                        "count, split over the processes")
    q.add_argument("--percdamp", type=float, default=None, help="GPTQ dampening (default 0.01)")
    q.add_argument("--actorder", action="store_true", default=None, help="GPTQ act-order")
    q.add_argument("--static-groups", action="store_true", default=None, help="GPTQ: group qparams up front")
    q.add_argument("--min-expert-tokens", type=int, default=None,
                   help="mixture of experts: experts with fewer calibration tokens are rounded to nearest (16)")
    q.add_argument("--lorc-rank", type=int, default=None,
                   help="LoRC low-rank error compensation after the weight algorithm: rank (default 0 = off)")
    q.add_argument("--lorc-bits", type=int, default=None, help="LoRC factor bits: 8 = INT8, 16 = fp16 (default)")
    _trained_flags(q)
    q.add_argument("--gguf-mix", default=None, choices=["q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m"],
                   help="llama.cpp's K-quant mix: with --wformat q4_k/q5_k, attn_v and ffn_down get more bits in "
                        "the layers llama.cpp gives them (e.g. q4_k_m: Q6_K there)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTPUT.partial (same settings and data)")
    q.add_argument("--ppl", default=None, help="after quantizing, evaluate perplexity on these datasets")
    q.add_argument("--ppl-limit", type=int, default=None, help="evaluate only the first N windows")
    q.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="write the packed codes to packed/quantized.safetensors + packed/quantization.json "
                        "(default; bitsmith.load and exports read them; --no-pack: only the dense weights)")
    scale.add_arguments(q)  # --stream, --max-memory, --offload-dir, --max-shard-size
    _add_common(q)


def _trained_flags(q: argparse.ArgumentParser) -> None:
    """The flags of the trained methods (OmniQuant's, and block reconstruction's for bitsmith/autoround)."""
    o = q.add_argument_group("OmniQuant (defaults: the official code's)")
    o.add_argument("--lwc", action=argparse.BooleanOptionalAction, default=None, help="learnable weight clipping")
    o.add_argument("--let", action=argparse.BooleanOptionalAction, default=None,
                   help="learnable equivalent transformation")
    o.add_argument("--epochs", type=int, default=None, help="training epochs per block (default 20)")
    o.add_argument("--lwc-lr", type=float, default=None, help="LWC learning rate (default 1e-2)")
    o.add_argument("--let-lr", type=float, default=None, help="LET learning rate (default 5e-3)")
    o.add_argument("--wd", type=float, default=None, help="AdamW weight decay (default 0)")
    o.add_argument("--aug-loss", action="store_true", default=None, help="add the fp-block-on-quantized-input target")
    o.add_argument("--keep-best", action="store_true", default=None,
                   help="restore each block's lowest-loss epoch instead of the last (not in the official code)")
    o.add_argument("--alpha", type=float, default=None,
                   help="SmoothQuant migration strength (LET init for omniquant; the method for smoothquant; 0.5)")
    r = q.add_argument_group("block reconstruction (methods bitsmith and autoround; defaults: the method's recipe)")
    r.add_argument("--steps", type=int, default=None, help="optimizer steps per block (bitsmith: 150, autoround: 200)")
    r.add_argument("--lr", type=float, default=None, help="learning rate of rounding/clipping (default 1/steps)")
    r.add_argument("--start", choices=["rtn", "gptq"], default=None,
                   help="start point the trainer refines (default rtn)")
    r.add_argument("--holdout", type=int, default=None,
                   help="calibration batches held out to pick the best step and stop early (default 0)")
    r.add_argument("--e2e-steps", type=int, default=None,
                   help="end-to-end norm tuning steps after the blocks (bitsmith: 30; 0 turns it off)")
    r.add_argument("--e2e-lr", type=float, default=None, help="end-to-end norm tuning learning rate (bitsmith: 0.05)")
    r.add_argument("--patience", type=int, default=None,
                   help="evaluations without improvement before stopping a block early (default 0 = never)")


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity / lm-eval task accuracy of a model folder or a bitsmith output folder")
    e.add_argument("model")
    e.add_argument("--ppl", default=None,
                   help="comma-separated datasets or paths (default wikitext2 unless --tasks is given)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N windows (perplexity) / N examples per task (--tasks)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy (needs .[lmeval])")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's)")
    e.add_argument("--tasks-dir", default=None, help="folder of custom lm-eval task YAMLs (lm-eval --include_path)")
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    _add_common(e)


def _export_parsers(sub) -> None:
    """``compare`` and ``export``: commands on finished output folders."""
    c = sub.add_parser("compare", help="table and PPL-vs-bits-per-weight plot of several quantize output folders")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by bitsmith quantize")
    c.add_argument("--output", "-o", default=None, help="write the scatter plot to this PNG (needs matplotlib)")
    c.add_argument("--dataset", default=None, help="perplexity dataset to plot (default: the first one found)")
    _add_common(c)

    x = sub.add_parser("export", help="convert a bitsmith output folder to another checkpoint format")
    x.add_argument("model", help="bitsmith output folder (written by bitsmith quantize)")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gguf"],
                   help="target checkpoint format (gguf: llama.cpp, LLaMA-family models)")
    x.add_argument("--output", "-o", required=True,
                   help="output folder, or for gguf a .gguf file path (refused if it exists, see --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder or file")
    x.add_argument("--strict", action="store_true",
                   help="refuse layers the format cannot store instead of leaving them dense")
    _add_common(x)


# ---- flags → QuantConfig -----------------------------------------------------------------------------------
def _spec_from_flags(bits: int | None, fmt_name: str, group: int | None, sym: bool, constraint: str,
                     activation: bool):
    from ..formats import PerChannel, PerGroup, PerToken, QuantSpec, make_format

    if bits == 16 and fmt_name == "int":
        return None
    fmt = make_format(fmt_name, bits=None if fmt_name != "int" and bits is None else bits,
                      symmetric=sym if not activation else False)
    sub = fmt.sub_block  # K-quants: the sub-block is the group
    gran = PerToken() if activation else (PerGroup(group or sub) if group or sub else PerChannel())
    return QuantSpec(fmt, gran, "none" if activation else constraint)


GPTQ_FLAGS = ("percdamp", "actorder", "static_groups")
OMNI_FLAGS = (("lwc", "lwc"), ("let", "let"), ("epochs", "epochs"), ("lwc_lr", "lwc_lr"), ("let_lr", "let_lr"),
              ("wd", "weight_decay"), ("aug_loss", "aug_loss"), ("alpha", "alpha"), ("keep_best", "keep_best"))
RECON_FLAGS = ("steps", "lr", "start", "holdout", "patience", "e2e_steps", "e2e_lr")


def _method_options(args: argparse.Namespace, base: dict[str, Any]) -> None:
    """The chosen method's options: the recipe's (when the recipe is for this method) or the library's default
    for this setting, with the method's flags applied."""
    import dataclasses

    from ..algorithms import DEFAULT_METHOD, get_method

    recipe_method = base.get("method")
    method = args.method or recipe_method or DEFAULT_METHOD
    base["method"] = method
    m = get_method(method)
    given = base.get("options") if method == recipe_method else None
    if m.options is None:
        base["options"] = None
        return
    opts = dict(given or dataclasses.asdict(m.default(base.get("act") is not None)))
    if m.v1_key == "gptq":
        _apply(opts, args, [(f, f) for f in GPTQ_FLAGS])
    elif m.v1_key == "omniquant":
        _apply(opts, args, OMNI_FLAGS)
    elif m.v1_key == "smoothquant":
        _apply(opts, args, [("alpha", "alpha")])
    elif m.v1_key == "reconstruct":
        _reconstruct_flags(args, opts)
    base["options"] = opts


def _apply(opts: dict[str, Any], args: argparse.Namespace, pairs) -> None:
    for flag, key in pairs:
        if getattr(args, flag) is not None:
            opts[key] = getattr(args, flag)


def _reconstruct_flags(args: argparse.Namespace, rec: dict[str, Any]) -> None:
    """The block-reconstruction flags applied to a learned method's options (``rec``, a dict)."""
    if args.let is not None:
        rec["let"] = args.let
    if args.epochs is not None:
        rec.update(epochs=args.epochs, steps=0)
    for flag in RECON_FLAGS:
        if getattr(args, flag) is not None:
            rec[flag] = getattr(args, flag)
            if flag == "steps":
                rec["epochs"] = 0
    if rec.get("holdout"):
        rec["best"] = "eval"
    rec["gptq"] = dict(rec.get("gptq") or {})
    _apply(rec["gptq"], args, [(f, f) for f in GPTQ_FLAGS])


def config_from_args(args: argparse.Namespace):
    """Build the QuantConfig: recipe file values, overridden by flags given on the command line."""
    from ..config import QuantConfig

    base: dict[str, Any] = QuantConfig.load(args.recipe).to_dict() if args.recipe else {}
    for key in ("calib", "nsamples", "seqlen", "seed", "calib_order", "batch_size"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.min_expert_tokens is not None:
        base["min_expert_tokens"] = args.min_expert_tokens
    if args.gguf_mix is not None:
        base["gguf_mix"] = args.gguf_mix
    if args.lorc_rank is not None:
        base["lorc_rank"] = args.lorc_rank
        if args.lorc_rank == 0 and args.lorc_bits is None:
            base["lorc_bits"] = None
    if args.lorc_bits is not None:
        base["lorc_bits"] = None if args.lorc_bits == 16 else args.lorc_bits
    weight_flags = (args.wbits, args.wformat, args.group_size, args.sym, args.scale_constraint)
    if not args.recipe or any(v is not None for v in weight_flags):
        wfmt = args.wformat or "int"
        wbits = args.wbits if args.wbits is not None else (4 if wfmt == "int" else None)
        if args.group_size is not None and args.group_size < 1:
            raise UsageError(f"--group-size must be a positive integer, got {args.group_size}; omit it for per-channel")
        spec = _spec_from_flags(wbits, wfmt, args.group_size, bool(args.sym), args.scale_constraint or "none", False)
        base["weight"] = None if spec is None else spec.to_dict()
    if not args.recipe or args.abits is not None or args.aformat is not None:
        afmt = args.aformat or "int"
        abits = args.abits if args.abits is not None else (16 if afmt == "int" else None)
        spec = _spec_from_flags(abits, afmt, None, False, "none", True)
        base["act"] = None if spec is None else spec.to_dict()
    if not args.recipe or args.kvbits is not None or args.kvformat is not None:
        kfmt = args.kvformat or "int"
        kbits = args.kvbits if args.kvbits is not None else (16 if kfmt == "int" else None)
        spec = _spec_from_flags(kbits, kfmt, None, False, "none", True)
        base["kv"] = None if spec is None else spec.to_dict()
    _method_options(args, base)  # after the specs: the default depends on whether activations are quantized
    return QuantConfig.from_dict(base)


# ---- commands ------------------------------------------------------------------------------------------
def run_options(args: argparse.Namespace):
    """The run options (:class:`bitsmith.run.RunOptions`) from the flags of ``bitsmith quantize``."""
    from ..run import RunOptions

    return RunOptions(device=args.device, stream=args.stream, max_memory=scale.parse_max_memory(args.max_memory),
                      max_memory_text=args.max_memory, offload_dir=args.offload_dir,
                      max_shard_bytes=scale.parse_size(args.max_shard_size, "--max-shard-size"), pack=args.pack,
                      resume=args.resume, overwrite=args.overwrite, ppl=tuple(_split(args.ppl)),
                      ppl_limit=args.ppl_limit, data_dir=args.data_dir, progress=not args.quiet,
                      e2e_mode=args.e2e_mode)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..run import quantize

    report = quantize(args.model, config_from_args(args), args.output, run_options(args))
    if report:  # torchrun: only rank 0 writes and reports
        _print_summary(report["label"], report["blocks"], report.get("ppl"), report["seconds"], report.get("memory"))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..eval.report import compare

    print(compare(args.runs, args.output, args.dataset))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..export.hf import read_report
    from ..models import get_architecture, load_model
    from ..pipeline import apply_recipe_quant
    from ..run import check_seqlen, evaluate
    from ..utils.device import resolve_device

    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    tasks = _split(args.tasks)
    if args.tasks is not None and not tasks:
        raise UsageError("--tasks needs at least one lm-eval task name")
    if not tasks and (args.num_fewshot is not None or args.tasks_dir is not None):
        raise UsageError("--num-fewshot and --tasks-dir apply to lm-eval tasks; add --tasks NAME[,NAME]")
    names = _split(args.ppl) if args.ppl is not None or tasks else ["wikitext2"]
    if args.ppl is not None and not names:
        raise UsageError("--ppl needs at least one dataset name or path")
    if tasks:
        from ..eval.lm_harness import require_lm_eval

        require_lm_eval()  # before loading anything
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model)
    if names:
        check_seqlen(model, args.seqlen)
    report = read_report(args.model)
    recipe = (report or {}).get("recipe", {})
    apply_recipe_quant(model, get_architecture(model), recipe)
    body: dict[str, Any] = {"model": str(args.model)}
    if tasks:  # first: a missing task or its data fails before the perplexity runs
        from ..eval.lm_harness import evaluate_tasks

        body["tasks"] = evaluate_tasks(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                       batch_size=args.batch_size, tasks_dir=args.tasks_dir, device=device)
        body.update(num_fewshot=args.num_fewshot, limit=args.limit)
    if names:
        body["ppl"] = evaluate(model, tokenizer, names, args.seqlen, args.limit, args.batch_size, device,
                               args.data_dir, not args.quiet)
        body["seqlen"] = args.seqlen
    if args.json:
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
    for name, v in body.get("ppl", {}).items():
        print(f"{name}\t{v:.4f}")
    for task, metrics in body.get("tasks", {}).items():
        print(f"{task}\t" + "\t".join(f"{k}={v:.4f}" if k != "samples" else f"{k}={v:.0f}"
                                        for k, v in metrics.items()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from ..export.gguf import export_gguf

        export_gguf(args.model, args.output, overwrite=args.overwrite, strict=args.strict)
    else:
        from ..export.compressed import export_compressed_tensors

        export_compressed_tensors(args.model, args.output, overwrite=args.overwrite, strict=args.strict)
    print(f"wrote {args.format} checkpoint to {args.output}")
    return 0


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def _print_summary(label: str, blocks: list[dict], ppl: dict | None, seconds: float,
                   memory: dict | None = None) -> None:
    """Per-block table: output error, mean weight error, reconstruction loss (trained methods), time, peak host
    RSS and peak accelerator memory; then the run's overall peaks."""
    trained = any("loss_final" in b for b in blocks)
    accel = any(b.get("peak_accelerator_mb") is not None for b in blocks)
    head = f"{'block':>5}  {'output MSE':>12}  {'mean weight err':>15}"
    print(head + (f"  {'loss init → final':>23}" if trained else "") + f"  {'seconds':>8}  {'RSS MB':>8}"
          + (f"  {'accel MB':>8}" if accel else ""))
    for b in blocks:
        errs = [s["weight_rel_err"] for s in b["layers"].values()]
        mean = sum(errs) / len(errs) if errs else float("nan")
        row = f"{b['block']:>5}  {b['output_mse']:>12.4g}  {mean:>15.4g}"
        if trained:
            row += f"  {b.get('loss_init', float('nan')):>10.4g} → {b.get('loss_final', float('nan')):<10.4g}"
        rss = b.get("peak_rss_mb", b.get("peak_memory_mb", float("nan")))
        row += f"  {b['seconds']:>8.2f}  {rss:>8.0f}"
        print(row + (f"  {b.get('peak_accelerator_mb') or 0.0:>8.0f}" if accel else ""))
    if memory:
        acc = memory.get("peak_accelerator_mb")
        print(f"{label}: {len(blocks)} blocks in {seconds:.1f} s, peak host RSS {memory['peak_rss_mb']:.0f} MB "
              f"(start {memory['baseline_rss_mb']:.0f} MB)" + ("" if acc is None else f", peak accelerator {acc:.0f} MB"))
    else:
        peak = max((b.get("peak_memory_mb", 0.0) for b in blocks), default=0.0)
        print(f"{label}: {len(blocks)} blocks in {seconds:.1f} s, peak memory {peak:.0f} MB")
    for name, v in (ppl or {}).items():
        print(f"{name} perplexity: {v:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    from ..utils import dist
    from ..utils.logging import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if dist.env_rank() > 0:  # under torchrun only rank 0 shows progress and information
        args.quiet = True
    setup_logging(-1 if args.quiet else args.verbose)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare,
                "export": cmd_export}[args.command](args)
    except BitsmithError as e:  # bitsmith's own errors: one line, exit 2; anything else is a bug (traceback)
        if args.verbose:
            log.exception("failed")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bitsmith: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitsmith: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
