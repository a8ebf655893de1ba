"""Scale benchmark: wall time, peak host RSS and peak accelerator memory of ``bitsmith quantize`` on generated
random-weight Llama models of growing size, streamed from disk or loaded whole, with 1 or more processes.

Each model is written block by block with :func:`bitsmith.export.shards.write_random_model` (fp32, untied head),
then quantized by the CLI in a fresh process (``OMP_NUM_THREADS`` = ``--threads``); the peaks are the run's own
accounting from ``bitsmith.json`` (``memory``: overall since the run started, including writing the weights;
``blocks[*]``: per block), the wall time is measured here around the whole command (process start, imports and
writing included). With ``--procs N > 1`` the run goes through ``torchrun --nproc_per_node N`` (data-parallel
calibration; rank 0's memory is reported; ``--batch-size`` must be a multiple of N).

    python benchmarks/scale.py --sizes 100MB 500MB 1GB --methods rtn gptq --modes stream load --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN_FOR = [(200 * 10**6, 512), (10**10, 1024), (10**13, 4096)]  # (largest size, hidden) pairs


def shape_for(size: int) -> dict[str, int]:
    """A Llama shape (hidden, intermediate ≈ 2.7·hidden, heads of 64, layers) whose fp32 blocks sum to ~``size``."""
    hidden = next(h for limit, h in HIDDEN_FOR if size <= limit)
    inter = int(hidden * 2.6875) // 64 * 64
    block = 4 * (4 * hidden * hidden + 3 * hidden * inter)
    return {"hidden": hidden, "inter": inter, "heads": hidden // 64, "layers": max(1, round(size / block))}


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, mult in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def make_model(folder: Path, shape: dict[str, int]) -> Path:
    from transformers import LlamaConfig

    from bitsmith.export.shards import write_random_model

    if (folder / "config.json").is_file():
        return folder
    cfg = LlamaConfig(vocab_size=2048, hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], max_position_embeddings=2048, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    return write_random_model(cfg, folder, max_shard_bytes=2 * 10**9)


def make_calib(path: Path, rows: int, length: int) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    path.write_text("".join(json.dumps({"input_ids": torch.randint(0, 2048, (length,), generator=g).tolist()}) + "\n"
                            for _ in range(rows)))
    return path


def run(model: Path, out: Path, calib: Path, method: str, mode: str, procs: int, args) -> dict:
    cli = ["quantize", str(model), "-o", str(out), "--overwrite", "--method", method, "--wbits", "4",
           "--group-size", "128", "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--batch-size", str(args.batch_size), "--threads", str(args.threads), "-q",
           "--device", args.device, "--stream" if mode == "stream" else "--no-stream"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "bitsmith"]
                if procs > 1 else [sys.executable, "-m", "bitsmith"])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(launcher + cli, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    report = json.loads((out / "bitsmith.json").read_text())
    mem = report["memory"]
    blocks = report["blocks"]
    return {"wall_s": round(wall, 1), "quantize_s": report["seconds"],
            "block_s": round(sum(b["seconds"] for b in blocks) / len(blocks), 2),
            "peak_rss_mb": mem["peak_rss_mb"], "baseline_rss_mb": mem["baseline_rss_mb"],
            "block_peak_rss_mb": max(b["peak_rss_mb"] for b in blocks),
            "peak_accelerator_mb": mem["peak_accelerator_mb"], "activations": report["scale"].get("activations")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["100MB", "500MB", "1GB"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--modes", nargs="+", default=["stream", "load"], choices=["stream", "load"])
    ap.add_argument("--procs", nargs="+", type=int, default=[1])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1, help="samples per step over all processes")
    ap.add_argument("--workdir", default="/tmp/bitsmith-scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    calib = make_calib(work / "calib.jsonl", max(args.nsamples, 16), args.seqlen)
    rows = []
    print("| model (fp32 on disk) | shape (hidden × layers) | method | mode | processes | wall (s) | s / block "
          "| peak RSS (MB) | RSS at start (MB) | peak accel. (MB) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        shape = shape_for(parse_size(size))
        model = make_model(work / f"llama-{shape['hidden']}x{shape['layers']}", shape)
        disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for method in args.methods:
            for mode in args.modes:
                for procs in args.procs:
                    r = run(model, work / "out", calib, method, mode, procs, args)
                    rows.append({"size_bytes": disk, **shape, "method": method, "mode": mode, "procs": procs, **r})
                    if "error" in r:
                        print(f"| {disk / 2**20:.0f} MiB | {shape['hidden']} × {shape['layers']} | {method} | {mode} "
                              f"| {procs} | error: {r['error']} |||||")
                    else:
                        acc = "–" if r["peak_accelerator_mb"] is None else f"{r['peak_accelerator_mb']:.0f}"
                        print(f"| {disk / 2**20:.0f} MiB | {shape['hidden']} × {shape['layers']} | {method} | {mode} "
                              f"| {procs} | {r['wall_s']:.1f} | {r['block_s']:.2f} | {r['peak_rss_mb']:.0f} "
                              f"| {r['baseline_rss_mb']:.0f} | {acc} |", flush=True)
                    shutil.rmtree(work / "out", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
