"""Peer side by side: bitsmith vs AutoRound and llm-compressor (GPTQ, AWQ) on the same tokens and windows.

Run by hand from the project root in bitsmith's venv, after ``benchmarks/peers_setup.sh`` built the peers' venv::

    OMP_NUM_THREADS=1 python benchmarks/peers.py --json /tmp/peers.json > /tmp/peers.md
    python benchmarks/peers.py --models aidreams260K --settings w3 --tools bitsmith autoround-all llmc-gptq

For every model x setting x tool it quantizes the fixture model in a subprocess (bitsmith rows: ``python -m bitsmith
quantize ... --calib-order file``; peer rows: ``benchmarks/peer_run.py`` in the peers' venv, which saves the peer's
fake-quantized weights as a plain Hugging Face folder), then evaluates every output here, in-process, with
bitsmith's perplexity code on identical windows.

- Calibration: the first 32 lines of ``<shared>/data/<model>-samples/valid.jsonl``, 128 ids each, in file order
  (the official-OmniQuant reference runner's protocol). Checked before anything runs: the tensor bitsmith's CLI
  builds (``calibration_samples(..., order="file")``) equals the one read here line by line, and every peer run
  reports the sha256 of the tensor it fed its tool, which must match.
- Evaluation: the first 40 non-overlapping 128-token windows of the concatenated ``test.jsonl``,
  ``bitsmith.eval.perplexity.perplexity`` (exp of the mean window loss).
- Activations (W4A4, W4A8): bitsmith rows re-apply the per-token activation quantizer recorded in their
  ``bitsmith.json`` (as ``bitsmith eval`` does); peer rows get the same spec through
  ``bitsmith.pipeline.apply_activation_quant`` (the peers were calibrated with their own equivalent per-token
  quantizer on). Weights: asymmetric INT per channel or groups of 32; W4A8 = FP4 (E2M1) groups of 32 with
  power-of-two group scales (bitsmith ``--scale-constraint m1``; the peers' MXFP4, E8M0 scales) + FP8 (E4M3)
  per-token activations.
- Wall time: the quantization call only (bitsmith: ``report.json`` ``seconds``, block-input capture + quantization;
  AutoRound: construction + ``quantize()``; llm-compressor: ``oneshot()``), one torch thread each.

Outputs go to ``--work`` (one folder per run; a finished run is reused unless ``--fresh``, so an interrupted
benchmark continues where it stopped). The markdown table goes to stdout, progress to stderr, everything to
``--json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitsmith.algorithms.default import BITSMITH
from bitsmith.data import calibration_samples, eval_windows, load_tokens
from bitsmith.eval.perplexity import model_forward, perplexity
from bitsmith.export.hf import read_report
from bitsmith.formats import PerToken, QuantSpec, make_format, spec_from_dict
from bitsmith.models import get_architecture, load_model
from bitsmith.pipeline import apply_activation_quant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import git_state, log  # noqa: E402  (sibling benchmark script: small shared helpers)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("aidreams260K", "stories260K")
TOKENIZER_MODEL = "aidreams260K"  # same 512-token vocabulary; the tools want a tokenizer object, never tokenize
AUTOROUND_ITERS = 200  # AutoRound's default


@dataclass(frozen=True)
class Setting:
    name: str
    wbits: int
    group: int | None = None
    abits: int = 16
    fp: bool = False  # FP4 weights (g32, power-of-two scales) + FP8 per-token activations

    def bitsmith_flags(self) -> list[str]:
        if self.fp:
            return ["--wformat", "fp4", "--group-size", "32", "--scale-constraint", "m1", "--aformat", "fp8"]
        flags = ["--wbits", str(self.wbits)]
        flags += ["--group-size", str(self.group)] if self.group else []
        return flags + (["--abits", str(self.abits)] if self.abits < 16 else [])

    def peer_flags(self) -> list[str]:
        if self.fp:
            return ["--wbits", "4", "--wformat", "fp4", "--abits", "8", "--aformat", "fp8"]
        flags = ["--wbits", str(self.wbits)]
        flags += ["--group-size", str(self.group)] if self.group else []
        return flags + (["--abits", str(self.abits), "--aformat", "int"] if self.abits < 16 else [])

    def act_spec(self) -> QuantSpec | None:
        """The per-token activation quantizer bitsmith's CLI records for this setting (asymmetric INT / E4M3)."""
        if self.fp:
            return QuantSpec(make_format("fp8"), PerToken(), "none")
        if self.abits < 16:
            return QuantSpec(make_format("int", bits=self.abits, symmetric=False), PerToken(), "none")
        return None

    @property
    def autoround_skips(self) -> bool:
        """Whether AutoRound's shape rule can leave linears 16-bit (INT weight-only, or MX/NV-FP weights)."""
        return self.fp or self.abits >= 16


SETTINGS = {
    "w2": Setting("W2 per-channel", 2), "w3": Setting("W3 per-channel", 3), "w4": Setting("W4 per-channel", 4),
    "w2g32": Setting("W2 g32", 2, 32), "w3g32": Setting("W3 g32", 3, 32),
    "w4a4": Setting("W4A4 (INT4 per-channel, INT4 per-token)", 4, None, 4),
    "w4a8": Setting("W4A8 (FP4 g32 pow2 scales, FP8 per-token)", 4, 32, 8, fp=True),
}


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    peer: str | None = None  # peer_run.py --tool
    method: str | None = None  # bitsmith --method (None: the default recipe)
    all_layers: bool = False
    equal_steps: bool = False


TOOLS = {t.key: t for t in (
    Tool("bitsmith", "bitsmith default recipe"),
    Tool("bitsmith-autoround", "bitsmith --method autoround", method="autoround"),
    Tool("bitsmith-omniquant", "bitsmith --method omniquant", method="omniquant"),
    Tool("bitsmith-gptq", "bitsmith --method gptq", method="gptq"),
    Tool("autoround", "AutoRound, its defaults (skips linears not multiple of 32)", peer="autoround"),
    Tool("autoround-all", "AutoRound, every linear quantized", peer="autoround", all_layers=True),
    Tool("autoround-all-eq", "AutoRound, every linear, equal steps", peer="autoround", all_layers=True,
         equal_steps=True),
    Tool("llmc-gptq", "llm-compressor GPTQ", peer="llmc-gptq"),
    Tool("llmc-awq", "llm-compressor AWQ", peer="llmc-awq"),
)}


CRITERION = ("bitsmith", "autoround-all", "autoround-all-eq", "llmc-gptq")
PRIORITY = ("bitsmith", "autoround-all", "llmc-gptq", "autoround-all-eq", "autoround", "llmc-awq",
            "bitsmith-autoround", "bitsmith-omniquant", "bitsmith-gptq")


@dataclass
class Job:
    model: str
    setting: str
    tool: str
    out: Path
    cmd: list[str] | None = None
    skip: str | None = None  # reason the row is not run ("n/a ..." or "same as ...")
    row: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--peers-python", type=Path,
                   default=Path(os.environ.get("PEERS_VENV", "/tmp/bitsmith-peers-venv")) / "bin" / "python",
                   help="python of the venv built by benchmarks/peers_setup.sh")
    p.add_argument("--work", type=Path, default=Path("/tmp/bitsmith-peers-work"), help="output folders")
    p.add_argument("--fresh", action="store_true", help="redo runs whose output already exists in --work")
    p.add_argument("--equal-iters", type=int, default=None,
                   help="AutoRound steps of the equal-steps rows (default: bitsmith's default recipe's steps)")
    p.add_argument("--autoround-iters", type=int, default=AUTOROUND_ITERS, help="AutoRound default rows' steps")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--jobs", type=int, default=1, help="quantization runs at once (each one thread)")
    p.add_argument("--report-only", action="store_true",
                   help="quantize nothing: table of the runs already finished in --work, the others 'not run'")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.equal_iters is None:
        args.equal_iters = BITSMITH.steps
    return args


# ---- data ---------------------------------------------------------------------------------------------------
def reference_calib(path: Path, nsamples: int, seqlen: int) -> torch.Tensor:
    rows = [json.loads(line)["input_ids"][:seqlen] for line in path.read_text().splitlines() if line.strip()]
    return torch.tensor(rows[:nsamples], dtype=torch.long)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def check_calibration(model: str, args) -> str:
    """sha256 of the calibration tensor, after checking bitsmith's CLI path builds exactly that tensor."""
    calib = args.shared / "data" / f"{model}-samples" / "valid.jsonl"
    ref = reference_calib(calib, args.nsamples, args.seqlen)
    ours = calibration_samples(calib, None, args.nsamples, args.seqlen, order="file")  # as cmd_quantize calls it
    if ref.shape != (args.nsamples, args.seqlen) or not torch.equal(ref, ours):
        raise SystemExit(f"peers.py: error: bitsmith's calibration tokens for {model} differ from the first "
                         f"{args.nsamples} lines of {calib}")
    return sha256(ref)


# ---- jobs ---------------------------------------------------------------------------------------------------
def make_job(model: str, skey: str, tkey: str, args) -> Job:
    s, t = SETTINGS[skey], TOOLS[tkey]
    out = args.work / model / skey / tkey
    job = Job(model, skey, tkey, out)
    model_dir = args.shared / "models" / model
    calib = args.shared / "data" / f"{model}-samples" / "valid.jsonl"
    if t.equal_steps and args.equal_iters == args.autoround_iters:
        job.skip = f"same as autoround-all (equal steps = {args.equal_iters})"
    elif t.peer == "autoround" and not t.all_layers and not s.autoround_skips:
        job.skip = "same as autoround-all (its shape rule applies only to weight-only INT and MX/NV-FP)"
    if job.skip:
        return job
    if t.peer is None:
        job.cmd = [sys.executable, "-m", "bitsmith", "quantize", str(model_dir), "-o", str(out), "--calib",
                   str(calib), "--calib-order", "file", "--nsamples", str(args.nsamples), "--seqlen",
                   str(args.seqlen), "--device", "cpu", "--threads", "1", "-q", *s.bitsmith_flags()]
        if t.method:
            job.cmd += ["--method", t.method]
        if t.method == "omniquant":  # the official scripts: 20 epochs, W2 40 + aug_loss, LET with activations
            job.cmd += ["--epochs", "40", "--aug-loss"] if s.wbits == 2 else ["--epochs", "20"]
            job.cmd += ["--let"] if s.abits < 16 else []
    else:
        iters = args.equal_iters if t.equal_steps else args.autoround_iters
        job.cmd = [str(args.peers_python), str(ROOT / "benchmarks" / "peer_run.py"), "--tool", t.peer, "--model",
                   str(model_dir), "--calib", str(calib), "--tokenizer", str(args.shared / "models" / TOKENIZER_MODEL),
                   "--out", str(out), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   *s.peer_flags()]
        if t.peer == "autoround":
            job.cmd += ["--iters", str(iters)] + (["--all-layers"] if t.all_layers else [])
    return job


def run_job(job: Job, fresh: bool, report_only: bool = False) -> Job:
    """Quantize (subprocess) unless a finished output is reused; fills ``job.row`` with wall time and notes."""
    done = job.out.with_name(job.out.name + ".run.json")
    if done.is_file() and job.out.is_dir() and not fresh:
        job.row = json.loads(done.read_text())
        if job.row.get("cmd") != job.cmd:
            job.row = {"error": f"{done} was made with another command; rerun with --fresh"}
        return job
    if report_only:
        job.row = {"error": "not run yet"}
        return job
    shutil.rmtree(job.out, ignore_errors=True)
    shutil.rmtree(job.out.with_name(job.out.name + ".partial"), ignore_errors=True)  # left by a killed bitsmith run
    job.out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    logfile = job.out.with_name(job.out.name + ".log")
    t0 = time.perf_counter()
    with open(logfile, "w") as logf:
        proc = subprocess.run(job.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=logf, text=True)
    total = time.perf_counter() - t0
    row: dict = {"cmd": job.cmd, "total_s": round(total, 1), "log": str(logfile)}
    if proc.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-1:] or ["(no output)"]
        row["error"] = f"exit {proc.returncode}: {tail[0][:300]}"
    elif TOOLS[job.tool].peer is None:
        rep = json.loads((job.out / "report.json").read_text())
        row.update(wall_s=rep["seconds"], cpu_s=rep.get("cpu_seconds"), label=rep.get("label"),
                   recipe=rep.get("recipe"))
    else:
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(wall_s=peer["wall_s"], cpu_s=peer.get("cpu_s"), peer=peer)
    job.row = row
    if "error" not in row:
        done.write_text(json.dumps(row, indent=2) + "\n")
    return job


# ---- evaluation ---------------------------------------------------------------------------------------------
def eval_windows_of(model: str, args) -> torch.Tensor:
    tokens = load_tokens(args.shared / "data" / f"{model}-samples" / "test.jsonl", "test")
    windows = eval_windows(tokens, args.seqlen, args.windows)
    if windows.shape[0] != args.windows:
        raise SystemExit(f"peers.py: error: {model} test split has only {windows.shape[0]} windows")
    return windows


def evaluate(folder: Path, windows: torch.Tensor, peer_act: QuantSpec | None) -> tuple[float, str]:
    """Perplexity of ``folder``; activation quantization from its ``bitsmith.json``, else ``peer_act``."""
    model, _ = load_model(folder)
    model.eval()
    report = read_report(folder)
    if report is not None:
        act = report["recipe"].get("act")
        spec = spec_from_dict(act) if act else None
        if spec != peer_act:
            raise SystemExit(f"peers.py: error: {folder} quantizes activations as {spec}, the peers as {peer_act}")
        how = "bitsmith.json (as bitsmith eval)" if spec else "none"
    else:
        spec, how = peer_act, ("apply_activation_quant" if peer_act else "none")
    if spec is not None:
        apply_activation_quant(model, get_architecture(model), spec)
    return perplexity(model_forward(model), windows), how


def finish_row(job: Job, windows: torch.Tensor, calib_sha: str, fp32: float) -> None:
    row = job.row
    if "error" in row or job.skip:
        return
    peer = row.get("peer")
    notes = []
    if peer is not None:
        if peer["calib_sha256"] != calib_sha:
            row["error"] = "calibration tokens differ from the reference"
            return
        if peer["left_16bit"]:
            notes.append(f"{len(peer['left_16bit'])} linears left 16-bit ({short_names(peer['left_16bit'])})")
        notes += [n for n in peer["notes"] if "pin_memory" not in n]
        s = SETTINGS[job.setting]
        limit = 15 if s.fp else 2 ** s.wbits
        if peer["max_levels"] > limit:
            notes.append(f"WARNING: a row-group holds {peer['max_levels']} distinct values > {limit}")
    row["ppl"], row["act_quant"] = evaluate(job.out, windows, SETTINGS[job.setting].act_spec())
    row["ppl_ratio"] = row["ppl"] / fp32
    row["notes"] = notes


def short_names(names: list[str]) -> str:
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(kinds)


# ---- report -------------------------------------------------------------------------------------------------
def table(jobs: list[Job], fp32: dict[str, float], args) -> str:
    lines = []
    for model in args.models:
        lines += [f"### {model} (fp32 PPL {fp32[model]:.4f})", "",
                  "| setting | tool / recipe | PPL | PPL / fp32 | wall s | CPU s | notes |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for job in (j for j in jobs if j.model == model):
            label = TOOLS[job.tool].label
            if TOOLS[job.tool].peer == "autoround":
                it = args.equal_iters if TOOLS[job.tool].equal_steps else args.autoround_iters
                label += f" ({it} steps)"
            name = SETTINGS[job.setting].name
            if job.skip:
                lines.append(f"| {name} | {label} | {job.skip} | | | | |")
            elif job.row.get("error") == "not run yet":
                lines.append(f"| {name} | {label} | not run yet | | | | |")
            elif "error" in job.row:
                lines.append(f"| {name} | {label} | n/a ({job.row['error']}) | | | | |")
            else:
                r = job.row
                lines.append(f"| {name} | {label} | {r['ppl']:.4f} | {r['ppl_ratio']:.3f} | {r['wall_s']:.1f} | "
                             f"{_num(r.get('cpu_s'))} | {'; '.join(r['notes'])} |")
        lines.append("")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def verdict(jobs: list[Job], args) -> str:
    """Issue #12's criterion per model x setting: bitsmith default below AutoRound (every linear, its default
    steps and equal steps) and llm-compressor GPTQ; wall and CPU time at most AutoRound's (every linear, default
    steps). CPU time (the process's, one torch thread) is the fairer of the two on a shared machine."""
    by = {(j.model, j.setting, j.tool): j for j in jobs}

    def ppl(m, s, t):
        j = by.get((m, s, t))
        if j is None:
            return None
        if j.skip and j.skip.startswith("same as autoround-all"):
            j = by.get((m, s, "autoround-all"))
        return None if j is None or j.skip or "error" in j.row else j.row

    lines = ["| model | setting | bitsmith PPL | < AutoRound all | < AutoRound all, equal steps | < llmc GPTQ | "
             "wall ≤ AutoRound all | CPU time ≤ AutoRound all |", "|---|---|---:|---|---|---|---|---|"]
    for m in args.models:
        for s in args.settings:
            b = ppl(m, s, "bitsmith")
            if b is None:
                continue
            cells = []
            for t in ("autoround-all", "autoround-all-eq", "llmc-gptq"):
                o = ppl(m, s, t)
                cells.append("–" if o is None else f"{'yes' if b['ppl'] < o['ppl'] else 'NO'} ({o['ppl']:.4f})")
            o = ppl(m, s, "autoround-all")
            for key in ("wall_s", "cpu_s"):
                if o is None or b.get(key) is None or o.get(key) is None:
                    cells.append("–")
                else:
                    cells.append(f"{'yes' if b[key] <= o[key] else 'NO'} ({b[key]:.0f} vs {o[key]:.0f})")
            lines.append(f"| {m} | {SETTINGS[s].name} | {b['ppl']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions(args) -> dict:
    out = {"python": platform.python_version(), "torch (bitsmith venv)": torch.__version__}
    from importlib.metadata import version

    out["transformers (bitsmith venv)"] = version("transformers")
    code = ("import json; from importlib.metadata import version as v; print(json.dumps({k: v(k) for k in "
            "('torch', 'transformers', 'auto-round', 'llmcompressor', 'compressed-tensors', 'accelerate')}))")
    try:
        peers = json.loads(subprocess.run([str(args.peers_python), "-c", code], capture_output=True, text=True,
                                          check=True).stdout)
        out.update({f"{k} (peers venv)": v for k, v in peers.items()})
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        out["peers venv"] = f"not found at {args.peers_python}: run benchmarks/peers_setup.sh"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "git": git_state(), "versions": versions(args),
            "equal_iters": args.equal_iters, "autoround_iters": args.autoround_iters, "jobs": args.jobs}
    log(f"peers.py: {json.dumps(info)}")
    if any(TOOLS[t].peer for t in args.tools) and not args.peers_python.exists():
        raise SystemExit(f"peers.py: error: {args.peers_python} not found; run benchmarks/peers_setup.sh first")
    calib_sha = {m: check_calibration(m, args) for m in args.models}
    windows = {m: eval_windows_of(m, args) for m in args.models}
    fp32 = {m: evaluate(args.shared / "models" / m, windows[m], None)[0] for m in args.models}
    log(f"calibration tokens identical for bitsmith's CLI path; sha256 {calib_sha}; fp32 PPL {fp32}")
    jobs = [make_job(m, s, t, args) for m in args.models for s in args.settings for t in args.tools]
    # issue #12's criterion rows first, one model x setting after the other; the other rows after them
    rank = {t: i for i, t in enumerate(PRIORITY)}
    todo = sorted((j for j in jobs if not j.skip),
                  key=lambda j: (j.tool not in CRITERION, args.models.index(j.model), args.settings.index(j.setting),
                                 rank[j.tool]))
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_job, j, args.fresh, args.report_only) for j in todo]
        for n, fut in enumerate(cf.as_completed(futures), 1):
            job = fut.result()
            finish_row(job, windows[job.model], calib_sha[job.model], fp32[job.model])
            r = job.row
            log(f"[{n}/{len(todo)}] {job.model} {job.setting} {job.tool}: "
                + (r["error"] if "error" in r else f"PPL {r['ppl']:.4f}, wall {r['wall_s']:.1f} s "
                   f"(process {r['total_s']} s)"))
    info["load_avg_end"] = os.getloadavg()
    info["total_s"] = round(time.perf_counter() - start, 1)
    print(table(jobs, fp32, args))
    print("Issue #12 criterion (bitsmith default recipe vs the peers):\n")
    print(verdict(jobs, args))
    if args.json:
        body = {**info, "calib_sha256": calib_sha, "fp32": fp32,
                "rows": [{"model": j.model, "setting": j.setting, "tool": j.tool, "skip": j.skip, **j.row}
                         for j in jobs]}
        args.json.write_text(json.dumps(body, indent=2, default=str) + "\n")
    log(f"peers.py: done in {info['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
