"""Cost growth with model width: time per block, end-to-end stage time, peak host RSS and accelerator memory of RTN,
GPTQ, the default recipe and AutoRound on generated random-weight Llama models of growing width.

Each width ``H`` gets a 2-block Llama (FFN = 2.6875·H rounded to 64, heads of 64, a 32000-token vocabulary so the
head's cost is real, untied, fp32) written by :func:`bitsmith.export.shards.write_random_model`, and one set of
random calibration ids (``--nsamples`` × ``--seqlen``, the same file for every tool). bitsmith runs through its CLI in
a fresh process (``--threads``; W4 g128 asymmetric INT; the default recipe with ``--steps`` block steps and its own
30 end-to-end steps), AutoRound through ``benchmarks/peer_run.py`` in the peer venv (``benchmarks/peers_setup.sh``)
with ``--iters`` = ``--steps``, the same batch (8, or fewer samples) and tokens (AutoRound wants a tokenizer object even
for token ids: the fixture's, never used to tokenize).

Reported per (width, method): seconds per block (bitsmith: the mean of ``bitsmith.json`` ``blocks[*].seconds``;
AutoRound: its ``quantize()`` wall time / blocks, which includes its input capture), the end-to-end stage's seconds,
the run's peak RSS (bitsmith: its own accounting; AutoRound: the child's ``ru_maxrss``), the peak accelerator memory,
and for the default recipe the memory plan's estimate of the end-to-end stage beside the measured memory it added.
Then, per method, the exponent ``k`` of ``time ∝ width^k`` (least squares on log-log) and the default/AutoRound
time ratio at each width.

    python benchmarks/scaling.py --widths 256 512 1024 2048 --threads 2 --json /tmp/scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 32000
PEERS = Path(os.environ.get("PEERS_VENV", "/tmp/bitsmith-peers-venv")) / "bin" / "python"


def shape(width: int) -> dict[str, int]:
    return {"hidden": width, "inter": int(width * 2.6875) // 64 * 64, "heads": max(1, width // 64), "layers": 2}


def make_model(folder: Path, s: dict[str, int]) -> Path:
    from transformers import LlamaConfig

    from bitsmith.export.shards import write_random_model

    if (folder / "config.json").is_file():
        return folder
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=4096, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return write_random_model(cfg, folder)


def make_calib(path: Path, rows: int, length: int) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, VOCAB, (length,), generator=g).tolist()}) + "\n"
                            for _ in range(rows)))
    return path


def _measured(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` in a wrapper process whose only child it is: (result, wall seconds, the child's peak RSS MB)."""
    wrapper = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps({'rc': r.returncode, 'maxrss_kb': resource.getrusage("
               "resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    last = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc, wall, last["maxrss_kb"] / 1024


def run_bitsmith(model: Path, out: Path, calib: Path, method: str, args) -> dict:
    cli = [sys.executable, "-m", "bitsmith", "quantize", str(model), "-o", str(out), "--overwrite", "--method",
           method, "--wbits", "4", "--group-size", "128", "--calib", str(calib), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--threads", str(args.threads), "-q", "--device", args.device,
           "--no-stream", "--no-pack"]
    if method == "bitsmith":
        cli += ["--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc, wall, _ = _measured(cli, env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-2][-300:]}
    report = json.loads((out / "bitsmith.json").read_text())
    blocks = report["blocks"]
    e2e = report.get("end_to_end") or {}
    plan = report["scale"].get("end_to_end") or {}
    return {"wall_s": round(wall, 1), "block_s": round(sum(b["seconds"] for b in blocks) / len(blocks), 3),
            "e2e_s": e2e.get("seconds"), "e2e_mode": e2e.get("mode"), "peak_rss_mb": report["memory"]["peak_rss_mb"],
            "peak_accelerator_mb": report["memory"]["peak_accelerator_mb"],
            "e2e_added_rss_mb": e2e.get("added_rss_mb"), "e2e_peak_accelerator_mb": e2e.get("peak_accelerator_mb"),
            "e2e_plan_mb": plan.get("need_mb")}


def run_autoround(model: Path, out: Path, calib: Path, layers: int, args) -> dict:
    if not PEERS.is_file():
        return {"error": f"no peer venv at {PEERS} (benchmarks/peers_setup.sh)"}
    cmd = [str(PEERS), str(ROOT / "benchmarks" / "peer_run.py"), "--tool", "autoround", "--model", str(model),
           "--calib", str(calib), "--out", str(out), "--wbits", "4", "--group-size", "128", "--iters",
           str(args.steps), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--threads",
           str(args.threads), "--all-layers", "--tokenizer", args.tokenizer]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc, wall, rss = _measured(cmd, env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-2][-300:]}
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "block_s": round(body["wall_s"] / layers, 3), "e2e_s": None,
            "peak_rss_mb": round(rss, 1), "peak_accelerator_mb": None}


def exponent(widths: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(width)."""
    pts = [(math.log(w), math.log(v)) for w, v in zip(widths, values) if v and v > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "bitsmith", "autoround"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="block steps of the default recipe = AutoRound iters")
    ap.add_argument("--workdir", default="/tmp/bitsmith-scaling")
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "models" / "aidreams260K"),
                    help="a tokenizer folder for AutoRound, which wants one even for token ids (never tokenizes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    calib = make_calib(work / "calib.jsonl", args.nsamples, args.seqlen)
    print(f"<!-- {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {args.threads}, "
          f"device {args.device}, {args.nsamples}×{args.seqlen} tokens, steps {args.steps} -->")
    print("| width | FFN | method | s / block | end-to-end (s) | e2e mode | e2e plan (MB) | e2e added (MB) "
          "| peak RSS (MB) | peak accel. (MB) |")
    print("|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
    rows = []
    for width in args.widths:
        s = shape(width)
        model = make_model(work / f"llama-{width}", s)
        for method in args.methods:
            out = work / "out"
            r = (run_autoround(model, out, calib, s["layers"], args) if method == "autoround"
                 else run_bitsmith(model, out, calib, method, args))
            shutil.rmtree(out, ignore_errors=True)
            rows.append({"width": width, **s, "method": method, **r})
            if "error" in r:
                print(f"| {width} | {s['inter']} | {method} | error: {r['error']} ||||||", flush=True)
                continue
            fmt = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
            added = r.get("e2e_peak_accelerator_mb") if args.device != "cpu" else r.get("e2e_added_rss_mb")
            print(f"| {width} | {s['inter']} | {method} | {r['block_s']:.2f} | {fmt(r['e2e_s'])} "
                  f"| {r.get('e2e_mode') or '–'} | {fmt(r.get('e2e_plan_mb'))} | {fmt(added)} "
                  f"| {r['peak_rss_mb']:.0f} | {fmt(r['peak_accelerator_mb'], '{:.0f}')} |", flush=True)
    summarize(rows, args.widths)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def summarize(rows: list[dict], widths: list[int]) -> None:
    """Exponents of time per block vs width, and the default/AutoRound ratio per width."""
    by = {(r["width"], r["method"]): r for r in rows if "error" not in r}
    print("\n| method | exponent k (s / block ∝ width^k) |\n|---|---:|")
    for method in dict.fromkeys(r["method"] for r in rows):
        k = exponent(widths, [by.get((w, method), {}).get("block_s") for w in widths])
        print(f"| {method} | {'–' if k is None else f'{k:.2f}'} |")
    print("\n| width | default / AutoRound, s per block |\n|---:|---:|")
    for w in widths:
        a, b = by.get((w, "bitsmith")), by.get((w, "autoround"))
        if a and b:
            print(f"| {w} | {a['block_s'] / b['block_s']:.2f} |")


if __name__ == "__main__":
    main()
