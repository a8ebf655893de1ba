"""Decode throughput of the fused W4 Triton kernel vs fp16 ``nn.Linear`` on a LLaMA-7B-shaped layer stack.

Run by hand on a machine with a CUDA GPU, from the project root (no arguments needed; ~1–2 min on an H100, most
of it building the random layers and, on the first run, compiling and autotuning the kernels)::

    python benchmarks/kernel_w4.py

What it does:

1. Builds ``--layers`` (32) decoder layers of LLaMA-7B linears — q, k, v, o (4096→4096), gate, up (4096→11008),
   down (11008→4096) — with random N(0, 0.02²) fp16 weights, once as fp16 ``nn.Linear`` and once as W4
   :class:`bitsmith.nn.PackedLinear` (asymmetric INT4, groups of ``--group-size`` 128, RTN, fp16 scales).
2. Checks the kernel first: for one layer of each shape, ``PackedLinear`` output (fused kernel) against its
   fp16 dequantized reference (``reference_forward``), and exits 1 if any error is above the fp16 tolerance.
3. Times one decode step at batch 1 (one token through all 7·layers linears; linears only, no attention, norms
   or activations), as a CUDA graph (launch overhead removed, as in serving engines) and eagerly, with CUDA
   events, after a warm-up that also runs the autotuner. Every layer has its own weights, so nothing of one
   token's weights stays in L2.
4. Per-shape kernel times (``triton.testing.do_bench``, L2 flushed between runs) for ``--batches`` (1).

Prints markdown tables to stdout (progress to stderr); ``--json`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch import nn

from bitsmith.formats import IntFormat, PerGroup, QuantSpec
from bitsmith.nn import PackedLinear
from bitsmith.utils.device import accelerator_available, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import git_state, log  # noqa: E402  (sibling benchmark script: small shared helpers)

HIDDEN, INTERMEDIATE = 4096, 11008
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (HIDDEN, INTERMEDIATE), "up": (HIDDEN, INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, LLaMA-7B)")
    p.add_argument("--group-size", type=int, default=128, help="W4 group size (default 128)")
    p.add_argument("--iters", type=int, default=50, help="timed decode steps per measurement (default 50)")
    p.add_argument("--batches", type=int, nargs="+", default=[1], help="token counts for the per-shape table")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    return p.parse_args(argv)


def build_layers(n_layers: int, group_size: int, device: torch.device) -> tuple[list[dict], list[dict]]:
    """``n_layers`` dicts name → fp16 nn.Linear, and the same weights as W4 PackedLinear."""
    spec = QuantSpec(IntFormat(4), PerGroup(group_size))
    fp16, w4 = [], []
    for i in range(n_layers):
        dense, packed = {}, {}
        for name, (n_in, n_out) in SHAPES.items():
            w = torch.randn(n_out, n_in, device=device, dtype=torch.float16) * 0.02
            lin = nn.Linear(n_in, n_out, bias=False, device=device, dtype=torch.float16)
            lin.weight.data = w
            dense[name] = lin
            packed[name] = PackedLinear(spec.quantize(w.float()), None, torch.float16)
        fp16.append(dense)
        w4.append(packed)
        if i % 8 == 7:
            log(f"  built {i + 1}/{n_layers} layers")
    return fp16, w4


def check_kernel(layer: dict, inputs: dict, batches: list[int]) -> list[dict]:
    """Fused kernel vs the fp16 dequantized reference on one layer of each shape; raises on a mismatch."""
    rows = []
    for m in sorted(set(batches) | {1}):
        for name in ("q", "gate", "down"):
            mod, x = layer[name], inputs[name][:1].expand(m, -1).contiguous()
            x = x + 0.01 * torch.randn_like(x)
            if mod.kernel_path(x) != "w4-triton":
                raise SystemExit(f"{name}: PackedLinear does not take the fused kernel on {x.device}")
            with torch.no_grad():
                y, ref = mod(x).float(), mod.reference_forward(x).float()
            bound = 5e-4 * (x.float().abs() @ mod.dequantized_weight().float().abs().T) + 1e-3
            err = (y - ref).abs()
            rows.append({"layer": name, "M": m, "max_abs_err": err.max().item(),
                         "max_rel_err": (err.max() / ref.abs().max()).item(), "ok": bool((err <= bound).all())})
            if not rows[-1]["ok"]:
                raise SystemExit(f"{name}, M={m}: fused kernel differs from the reference (max error "
                                 f"{err.max().item():.3g}); not timing a wrong kernel")
    return rows


def decode_step(layers: list[dict], inputs: dict) -> None:
    for layer in layers:
        for name, mod in layer.items():
            mod(inputs[name])


def time_eager(layers: list[dict], inputs: dict, iters: int) -> float:
    """Milliseconds per decode step, launched from Python each time."""
    for _ in range(3):
        decode_step(layers, inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        decode_step(layers, inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_graph(layers: list[dict], inputs: dict, iters: int) -> float:
    """Milliseconds per decode step replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up off the capture (autotuning and compilation happen here)
            decode_step(layers, inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        decode_step(layers, inputs)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def per_shape(fp16: dict, w4: dict, batches: list[int], device: torch.device) -> list[dict]:
    """Microseconds per call of one linear of each distinct shape (L2 flushed between calls)."""
    from triton.testing import do_bench

    rows = []
    for name in ("q", "gate", "down"):
        n_in, n_out = SHAPES[name]
        for m in batches:
            x = torch.randn(m, n_in, device=device, dtype=torch.float16)
            with torch.no_grad():
                t16 = do_bench(lambda: fp16[name](x)) * 1e3
                t4 = do_bench(lambda: w4[name](x)) * 1e3
            rows.append({"shape": f"{n_in}→{n_out}", "M": m, "fp16_us": t16, "w4_us": t4, "speedup": t16 / t4})
    return rows


def weight_bytes(layers: list[dict]) -> int:
    total = 0
    for layer in layers:
        for mod in layer.values():
            total += mod.buffer_nbytes() if isinstance(mod, PackedLinear) else mod.weight.numel() * 2
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import triton
    except ImportError:
        triton = None
    if not accelerator_available() or triton is None:
        log("benchmarks/kernel_w4.py needs a CUDA GPU and Triton (pip install -e \".[gpu]\"); "
            f"found: accelerator={accelerator_available()}, triton={triton is not None}. Nothing measured.")
        return 1
    torch.manual_seed(0)
    device = resolve_device(None)
    gpu = torch.cuda.get_device_name(device)
    log(f"{gpu}: building {args.layers} LLaMA-7B-shaped layers (fp16 and W4 g{args.group_size}) …")
    fp16, w4 = build_layers(args.layers, args.group_size, device)
    inputs = {name: torch.randn(1, n_in, device=device, dtype=torch.float16) for name, (n_in, _) in SHAPES.items()}
    log("checking the fused kernel against the fp16 dequantized reference …")
    checks = check_kernel(w4[0], inputs, args.batches)
    log("timing (first run: Triton compiles and autotunes during the warm-up) …")
    res = {"gpu": gpu, "layers": args.layers, "group_size": args.group_size, "iters": args.iters,
           "torch": torch.__version__, "triton": triton.__version__, "git": git_state(),
           "date": datetime.date.today().isoformat(), "checks": checks,
           "fp16_bytes": weight_bytes(fp16), "w4_bytes": weight_bytes(w4)}
    with torch.no_grad():
        res["w4_graph_ms"] = time_graph(w4, inputs, args.iters)
        res["fp16_graph_ms"] = time_graph(fp16, inputs, args.iters)
        res["w4_eager_ms"] = time_eager(w4, inputs, max(args.iters // 5, 3))
        res["fp16_eager_ms"] = time_eager(fp16, inputs, max(args.iters // 5, 3))
    res["per_shape"] = per_shape(fp16[0], w4[0], args.batches, device)

    g16, g4 = res["fp16_graph_ms"], res["w4_graph_ms"]
    e16, e4 = res["fp16_eager_ms"], res["w4_eager_ms"]
    print(f"## W4 decode, batch 1, {args.layers}×(q,k,v,o,gate,up,down) LLaMA-7B shapes — {gpu}, torch "
          f"{torch.__version__}, triton {triton.__version__}, commit {res['git']['commit']}\n")
    print("| GPU | fp16 ms/token (graph) | W4 g{0} ms/token (graph) | speedup (graph) | fp16 ms/token (eager) "
          "| W4 ms/token (eager) | speedup (eager) | weights fp16 / W4 (GB) | W4 effective GB/s |".format(
              args.group_size))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {gpu} | {g16:.3f} | {g4:.3f} | {g16 / g4:.2f}× | {e16:.3f} | {e4:.3f} | {e16 / e4:.2f}× "
          f"| {res['fp16_bytes'] / 1e9:.2f} / {res['w4_bytes'] / 1e9:.2f} | {res['w4_bytes'] / g4 / 1e6:.0f} |")
    print("\nPer linear (do_bench, L2 flushed):\n")
    print("| shape | M | fp16 µs | W4 µs | speedup |\n|---|---:|---:|---:|---:|")
    for r in res["per_shape"]:
        print(f"| {r['shape']} | {r['M']} | {r['fp16_us']:.1f} | {r['w4_us']:.1f} | {r['speedup']:.2f}× |")
    worst = max(c["max_rel_err"] for c in checks)
    print(f"\nCorrectness: fused kernel vs fp16 dequantized reference, max |error| / max |ref| = {worst:.2e} "
          f"(q, gate, down; M = {sorted({c['M'] for c in checks})}).")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
