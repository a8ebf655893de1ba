"""Memory accounting and placement: host RSS (current and resettable peak), accelerator peaks per phase, size
parsing-free helpers, and the store that keeps calibration activations on the device, in host memory or on disk.

Host peaks (Linux): ``VmRSS``/``VmHWM`` of ``/proc/self/status``; a phase's peak is measured by resetting the
high-water mark (writing ``5`` to ``/proc/self/clear_refs``) at its start, so every block gets its own exact peak.
:class:`MemoryMeter` reads the mark before each reset, so its overall peak is the process peak since the meter was
created. Without ``/proc`` (macOS, …) the peak is ``ru_maxrss``, which cannot be reset: per-phase peaks are then
the process peak so far (``resettable`` is False in the summary).
"""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import ConfigError
from .device import is_accelerator, peak_memory_bytes, reset_peak_memory

log = logging.getLogger(__name__)

MiB = 2**20
GiB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def rss_bytes() -> int:
    """This process's resident set size now (VmRSS; psutil or ru_maxrss where /proc is missing)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return _ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since the last :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; False when this system cannot (the peak then keeps
    growing over the whole process)."""
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def available_host_bytes() -> int:
    """Host memory a new allocation can get without swapping (``MemAvailable``; psutil elsewhere)."""
    try:
        text = Path("/proc/meminfo").read_text()
        match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class MemoryMeter:
    """Per-phase (e.g. per-block) wall time and peaks of host RSS and accelerator memory, plus overall peaks.

    ``start()`` begins a phase (resets the peaks), ``stop()`` ends it and returns
    ``{"peak_rss_mb", "peak_accelerator_mb"}`` (the latter None on the CPU; wall seconds in ``last_seconds``).
    :meth:`summary` gives the overall figures since the meter was created.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.accelerator = is_accelerator(self.device)
        self.baseline_rss = rss_bytes()
        self.peak_rss = peak_rss_bytes()
        self.peak_accel = peak_memory_bytes(self.device) if self.accelerator else 0
        self.resettable = True
        self._t0 = time.perf_counter()
        self.last_seconds = 0.0

    def _fold(self) -> None:
        self.peak_rss = max(self.peak_rss, peak_rss_bytes())
        if self.accelerator:
            self.peak_accel = max(self.peak_accel, peak_memory_bytes(self.device))

    def start(self) -> None:
        """Begin a phase: fold the peaks so far into the overall ones, then reset them."""
        self._fold()
        self.resettable = reset_peak_rss() and self.resettable
        if self.accelerator:
            reset_peak_memory(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float | None]:
        """End a phase: its peaks in MiB (``peak_accelerator_mb`` None on the CPU) and wall seconds."""
        self.last_seconds = time.perf_counter() - self._t0
        rss = peak_rss_bytes()
        accel = peak_memory_bytes(self.device) if self.accelerator else None
        self._fold()
        return {"peak_rss_mb": round(rss / MiB, 1),
                "peak_accelerator_mb": None if accel is None else round(accel / MiB, 1)}

    def summary(self) -> dict[str, float | bool | None]:
        """Overall peaks since the meter was created (MiB), the RSS it started from, and whether the host
        peak could be reset per phase."""
        self._fold()
        return {"baseline_rss_mb": round(self.baseline_rss / MiB, 1), "peak_rss_mb": round(self.peak_rss / MiB, 1),
                "peak_accelerator_mb": round(self.peak_accel / MiB, 1) if self.accelerator else None,
                "peak_rss_resettable": self.resettable}


# ---- calibration activations: on the device, in host memory or on disk ------------------------------------------
PLACEMENTS = ("device", "host", "disk")


class _OnDisk:
    """One offloaded tensor file; deleted when the last store holding it lets go."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __del__(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


class ActivationStore(Sequence[torch.Tensor]):
    """A list of activation tensors (one ``(b, T, H)`` per batch) kept away from the compute device.

    ``placement``: ``"host"`` keeps them in host memory (pinned when ``device`` is an accelerator); ``"disk"``
    writes each to its own file under ``folder`` (``torch.save``) and reads it back memory-mapped. Indexing and
    iteration return tensors on ``device``, one at a time, so code written for a plain list works unchanged while
    only the batch in use occupies the device. Values round-trip exactly. ``new()`` gives an empty store of the
    same kind (e.g. for a block's outputs), ``append`` adds a tensor, ``copy()`` shares the tensors; a file is
    deleted when no store holds it any more.
    """

    def __init__(self, device: torch.device | str, placement: str, folder: str | Path | None = None) -> None:
        if placement not in ("host", "disk"):
            raise ValueError(f"ActivationStore placement must be 'host' or 'disk', got {placement!r}")
        if placement == "disk" and folder is None:
            raise ConfigError("disk offload needs a folder; pass --offload-dir")
        self.device = torch.device(device)
        self.placement = placement
        self.root = Path(folder) if folder is not None else None
        self._items: list[torch.Tensor | _OnDisk] = []

    def new(self) -> ActivationStore:
        """An empty store with the same placement (and offload folder)."""
        return ActivationStore(self.device, self.placement, self.root)

    def append(self, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (it leaves the device)."""
        tensor = tensor.detach()
        if self.placement == "disk":
            assert self.root is not None
            self.root.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="act-", suffix=".pt", dir=self.root)
            os.close(fd)
            item = _OnDisk(Path(name))
            torch.save(tensor.cpu(), item.path)
            self._items.append(item)
            return
        host = tensor.to("cpu")
        if is_accelerator(self.device):
            host = host.pin_memory()
        self._items.append(host)

    def extend(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self.append(t)

    def __len__(self) -> int:
        return len(self._items)

    def _load(self, item: torch.Tensor | _OnDisk) -> torch.Tensor:
        if isinstance(item, _OnDisk):
            return torch.load(item.path, mmap=True, weights_only=True).to(self.device)
        return item.to(self.device, non_blocking=item.is_pinned())

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._load(x) for x in self._items[index]]
        return self._load(self._items[index])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for item in self._items:
            yield self._load(item)

    def copy(self) -> ActivationStore:
        """A store holding the same tensors (they are never modified in place, so sharing is safe)."""
        out = self.new()
        out._items = list(self._items)
        return out


def new_like(hidden: Sequence[torch.Tensor]) -> ActivationStore | list[torch.Tensor]:
    """An empty container of the same kind as ``hidden`` (a store keeps outputs where it keeps its inputs)."""
    return hidden.new() if isinstance(hidden, ActivationStore) else []


def copy_like(hidden: Sequence[torch.Tensor]) -> ActivationStore | list[torch.Tensor]:
    """A second container holding the same tensors as ``hidden`` (same kind)."""
    return hidden.copy() if isinstance(hidden, ActivationStore) else list(hidden)


def as_store(tensors: Sequence[torch.Tensor], device: torch.device | str, placement: str,
             folder: str | Path | None = None) -> Sequence[torch.Tensor]:
    """``tensors`` kept per ``placement``: a plain list for ``"device"``, else an :class:`ActivationStore`."""
    if placement == "device":
        return list(tensors)
    store = ActivationStore(device, placement, folder)
    store.extend(tensors)
    return store


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human string (GiB, MiB or KiB)."""
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 2**10:.1f} KiB"


# ---- how much memory one block needs ------------------------------------------------------------------------------
def accelerator_memory(device: torch.device | str) -> tuple[int, int] | None:
    """``(free, total)`` bytes of an accelerator (None on the CPU or when torch cannot tell)."""
    if not is_accelerator(device):
        return None
    info = getattr(getattr(torch, "accelerator", None), "get_memory_info", None)
    if info is None:
        return None
    free, total = info(torch.device(device))
    return int(free), int(total)


def block_need(*, weight_bytes: int, linears: Sequence[tuple[int, int]], hidden: int, intermediate: int,
               heads: int, batch: int, seqlen: int, elem: int, gptq: bool = False, trained: bool = False,
               rounding: bool = False, group_size: int | None = None, collected_tokens: int = 0,
               hessian_budget: int = 0) -> dict[str, int]:
    """Bytes one decoder block needs on the compute device while it is quantized, by part (an estimate that
    errs high; calibration activations are counted separately, see :func:`activation_set_bytes`).

    ``weight_bytes``: the block's tensors in the compute dtype; ``linears``: ``(out, in)`` of each quantized
    linear, in the order they are solved; ``hidden``/``intermediate``/``heads``: its geometry;
    ``batch``×``seqlen``: one calibration batch; ``elem``: bytes per activation element.

    Parts: the weights; the quantized copies (a dequantized weight per linear plus one byte of codes per weight;
    the checkpoint writer later serialises as much in memory: the block's state and codes); per-layer temporaries
    (three fp32 copies of the largest weight: error statistics, the deployable copy); one batch's forward
    intermediates (MLP, q/k/v/o, and attention scores ``b·heads·T²`` in fp32, which fused attention kernels never
    materialise: an upper bound); AWQ's collected inputs (``collected_tokens`` per linear input); and the larger
    of GPTQ at its worst step (the Hessians not yet solved, ``in × in`` fp32 each, a block's all collected in one
    pass, plus the solver's workspace for the linear being solved: five ``in × in`` fp32 — permuted Hessian,
    identity, Cholesky factor, inverse, its factor — and three ``out × in`` fp32 — weight, codes, latent; at most
    ``hessian_budget`` bytes of Hessians when given, GPTQ's ``hessian_mb``: many experts are collected in passes) and
    training (autograd keeps twice the forward intermediates for backward; trained parameters, gradients and AdamW
    moments: per weight with learned rounding, else per group).
    """
    n_weights = sum(o * i for o, i in linears)
    tokens = batch * seqlen
    forward = tokens * (4 * hidden + 3 * intermediate) * elem
    work = {"quantized copies": weight_bytes + n_weights,
            "per-layer temporaries": 3 * 4 * max([o * i for o, i in linears] + [0]),
            "forward (one batch)": forward + batch * heads * seqlen * seqlen * 4}
    if collected_tokens:
        work["collected inputs"] = sum(4 * collected_tokens * i for _, i in linears)
    algo: dict[str, int] = {}
    if gptq and linears:  # Hessians are freed one by one as their linear is solved: the peak is the worst step
        steps = [(sum(4 * i * i for _, i in linears[k + 1:]), 5 * 4 * i * i + 3 * 4 * o * i)
                 for k, (o, i) in enumerate(linears)]
        pending, solver = max(steps, key=sum)
        if hessian_budget:  # GPTQConfig.hessian_mb: collected in passes of at most this much (or one layer's)
            pending = min(pending, max(hessian_budget, max(4 * i * i for _, i in linears)))
        algo = {"GPTQ Hessians": pending, "GPTQ solver": solver}
    if trained:  # after any GPTQ start point (its workspace is freed)
        learned = n_weights if rounding else sum(2 * o * -(-i // (group_size or i)) for o, i in linears)
        training = {"backward (saved activations)": 2 * forward, "trained parameters (+grad, AdamW)": 16 * learned}
        algo = max(algo, training, key=lambda d: sum(d.values()))
    return {"weights": weight_bytes, **work, **algo}


E2E_MODES = ("whole", "checkpointed", "offloaded", "streamed")


def end_to_end_need(mode: str, *, model_bytes: int, block_bytes: int, ends_bytes: int, layers: int, hidden: int,
                    intermediate: int, heads: int, vocab: int, batch: int, seqlen: int, units: int, elem: int,
                    chunk: int, teacher_on_device: bool) -> dict[str, int]:
    """Bytes the end-to-end stage (:mod:`bitsmith.end_to_end`) adds on its device in ``mode``, by part (an
    estimate that errs high). ``model_bytes``/``block_bytes``/``ends_bytes``: all weights, the largest block's,
    those outside the blocks; ``batch``×``seqlen``: one training batch; ``units``: this rank's calibration
    sequences (all of them run, block by block, in each evaluation); ``chunk``: the KL's tokens per chunk.

    Parts: the weights on the device (all of them for ``whole``/``checkpointed``; else the ends and two blocks,
    the one in use and the one being read); the teacher's final hidden states (``units·T·H`` fp32, unless kept on the
    host; twice: with the full-precision outputs they are computed from); and the larger of training and evaluation.
    Training, ``whole``: every block's forward intermediates twice (what autograd saves; the weights are frozen) and
    the full logits six times (student's, their log-softmax and its gradient, the teacher's log-probabilities and
    their exponential, the KL's terms: ~5 measured, benchmarks/RESULTS.md "Scaling"); evaluation there: six times
    one batch's logits; block by block: the blocks' inputs (``layers+1``
    of ``b·T·H`` fp32), one block's intermediates three times, one chunk's logits six times. Evaluation (block by
    block): every sequence's hidden state twice (a block's inputs and outputs)."""
    tokens = batch * seqlen
    forward = tokens * (4 * hidden + 3 * intermediate) * elem + batch * heads * seqlen * seqlen * 4
    resident = mode in ("whole", "checkpointed")
    parts = {"weights": model_bytes if resident else ends_bytes + 2 * block_bytes,
             "teacher hidden states": 2 * units * seqlen * hidden * 4 if teacher_on_device else 0}
    if mode == "whole":
        train = {"autograd (every block)": 2 * forward * layers, "logits": 6 * tokens * vocab * 4}
    else:
        train = {"block inputs (checkpoints)": (layers + 1) * tokens * hidden * 4,
                 "one block's autograd": 3 * forward, "KL chunk logits": 6 * min(chunk, tokens) * vocab * 4}
    evaluate = {"evaluation hidden states": 2 * units * seqlen * hidden * 4,
                "KL chunk logits": 2 * min(chunk, tokens) * vocab * 4}
    if mode == "whole":
        evaluate = {"evaluation logits": 6 * tokens * vocab * 4 + forward}
    return {**parts, **max(train, evaluate, key=lambda d: sum(d.values()))}


def activation_set_bytes(nsamples: int, seqlen: int, hidden: int, elem: int) -> int:
    """One set of calibration activations: ``nsamples × seqlen × hidden`` elements."""
    return nsamples * seqlen * hidden * elem


def activation_sets(trained: bool, aug_loss: bool = False) -> int:
    """How many activation sets are alive while a block is quantized: its inputs, full-precision outputs and
    quantized outputs (3); trained methods add the full-precision chain's inputs and the targets (5, +1 with the
    augmented loss)."""
    return (5 + int(aug_loss)) if trained else 3


def trim_host_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); False where unavailable.

    glibc serves allocations below its (self-raising) mmap threshold from the heap and keeps them when freed, so a
    process that loads and frees one block after another grows by fragments of each; trimming after every block
    keeps host RSS at what is live.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
