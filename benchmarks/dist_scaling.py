"""Data-parallel calibration: wall time of ``bitsmith quantize`` with 1 process vs ``torchrun`` with N processes.

Run by hand (not by CI), from the project root, e.g.::

    python benchmarks/dist_scaling.py --procs 1 2 --threads 1 > /tmp/dist.md

For each method (GPTQ W3 g32; OmniQuant W3 g32, LWC, ``--epochs``) the CLI runs in a fresh subprocess: once as
``python -m bitsmith quantize …`` and once per N > 1 as ``python -m torch.distributed.run --standalone
--nproc-per-node N -m bitsmith quantize …`` (gloo on the CPU, ``--threads`` torch threads per process), on the same
calibration samples and the same global ``--batch-size``. Reported: wall time of the whole command (start-up,
model loading and evaluation included), the pipeline's own time (``seconds`` in ``bitsmith.json``, rank 0's) and
the perplexity on the first ``--ppl-limit`` test windows (the runs must agree to float tolerance).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "gptq": ["--method", "gptq"],
    "omniquant": ["--method", "omniquant", "--lwc"],
}


def _run(procs: int, method: str, args: argparse.Namespace, out: Path) -> dict:
    model = Path(args.shared) / "models" / args.model
    data = Path(args.shared) / "data" / f"{args.model}-samples"
    cli = ["quantize", str(model), *METHODS[method], "--wbits", "3", "--group-size", "32", "--calib", str(data),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
           "--ppl", str(data), "--ppl-limit", str(args.ppl_limit), "--threads", str(args.threads), "-q",
           "-o", str(out)]
    if method == "omniquant":
        cli += ["--epochs", str(args.epochs)]
    launch = [sys.executable, "-m", "bitsmith"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m",
        "bitsmith"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(launch + cli, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{method} with {procs} processes failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    report = json.loads((out / "bitsmith.json").read_text())
    (ppl,) = report["ppl"].values()
    return {"wall": wall, "pipeline": report["seconds"], "ppl": ppl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--model", default="aidreams260K")
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2, help="global samples per step (split over processes)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ppl-limit", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}; "
          f"{args.threads} thread(s) per process; {args.model}, {args.nsamples} x {args.seqlen} tokens, "
          f"global batch {args.batch_size}, OmniQuant {args.epochs} epochs\n")
    print("| method | processes | wall s | pipeline s | speed-up (pipeline) | perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            base = None
            for n in args.procs:
                r = _run(n, method, args, Path(tmp) / f"{method}-{n}")
                base = base or r["pipeline"]
                print(f"| {method} | {n} | {r['wall']:.1f} | {r['pipeline']:.1f} | {base / r['pipeline']:.2f} | "
                      f"{r['ppl']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
