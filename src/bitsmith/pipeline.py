"""The quantization pipeline: calibration inputs → block-by-block quantization → quantized model + report.

Only one decoder block sits on the compute device at a time. Each block is quantized with inputs produced by
the already-quantized blocks before it (GPTQ/OmniQuant convention).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import BlockJob, get_method
from .algorithms.e2e import EndToEndConfig
from .algorithms.lorc import LoRCFactors, collect_factors, lorc_block
from .algorithms.rtn import rtn_block
from .checkpoint import Checkpoint
from .config import QuantConfig
from .end_to_end import run_end_to_end
from .errors import CheckpointError, NumericsError
from .formats import QuantizedTensor, QuantSpec, fallback_spec, mix_spec, spec_from_dict
from .models import (
    Architecture,
    BlockInputs,
    block_forward,
    capture_block_inputs,
    find_linears,
    get_blocks,
    split_experts,
)
from .models.edges import let_edges
from .models.kvcache import enable_kv_quant
from .models.moe import expert_index
from .models.streaming import BlockStream
from .nn import QuantLinear, quant_linears, set_quant_state, to_fake
from .utils import dist
from .utils.device import empty_cache, peak_memory_bytes, reset_peak_memory
from .utils.memory import MemoryMeter, as_store, copy_like, new_like, rss_bytes

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    """Frozen weights by qualified module name, and per-block/per-layer statistics. With LoRC, ``lorc`` holds each
    layer's low-rank factors (the saved model weight is then ``frozen[name]`` dequantized + A·B)."""

    frozen: dict[str, QuantizedTensor] = field(default_factory=dict)
    lorc: dict[str, LoRCFactors] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads), comparable across machine load
    memory: dict = field(default_factory=dict)
    end_to_end: dict = field(default_factory=dict)


def _spec_fn(config: QuantConfig, arch: Architecture | None = None, index: int | None = None,
             n_layers: int | None = None):
    """Per-linear ``(weight, act)`` specs: the recipe's, with llama.cpp's K-quant mix (``gguf_mix``, by the
    linear's role in the row and the block index) and its fallback for rows not a multiple of 256."""
    roles = {}
    if config.gguf_mix and arch is not None:
        roles = {arch.v_to_o[0]: "attn_v", arch.up_to_down[1]: "ffn_down"} if arch.v_to_o and arch.up_to_down else {}

    def fn(name: str, lin: nn.Linear) -> tuple[QuantSpec | None, QuantSpec | None]:
        if config.weight is None:
            return None, config.act
        mixed = config.weight
        if config.gguf_mix and index is not None:
            mixed = mix_spec(config.gguf_mix, mixed, roles.get(name), index, n_layers)
        spec = fallback_spec(mixed, lin.in_features)
        if spec is not mixed:
            log.warning("%s: %d weights per row is not a multiple of 256, so %s falls back to %s %s as llama.cpp's "
                        "quantizer does", name, lin.in_features, mixed.format.name, spec.format.name,
                        spec.granularity.kind)
        return spec, config.act
    return fn


def _mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.float() - y.float()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(x.numel() for x in a)
    num, den = dist.sum_scalars([num, den])  # over all ranks' samples under torch.distributed
    return num / max(den, 1)


@torch.no_grad()
def _outputs(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    out = new_like(hidden)  # an offloaded store keeps the outputs where it keeps the inputs
    for h, kw in zip(hidden, kwargs):
        out.append(block_forward(block, h, kw))
    return out


def quantize_block(block: nn.Module, config: QuantConfig, hidden: list[torch.Tensor], kwargs: list[dict],
                   fp_hidden: list[torch.Tensor] | None = None, arch: Architecture | None = None,
                   model_config=None, name: str = "block",
                   index: int | None = None) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """Quantize the linears of one block in place.

    ``hidden``: the block's inputs, one ``(b, T, H)`` tensor per batch, from the quantized prefix;
    ``fp_hidden``: the full-precision model's inputs to this block (OmniQuant's targets), when tracked.
    Returns (block statistics with ``"layers"``, quantized outputs, full-precision outputs).
    """
    names = list(find_linears(block))
    n_layers = getattr(model_config, "num_hidden_layers", None)
    all_qlinears = to_fake(block, names, _spec_fn(config, arch, index, n_layers))
    set_quant_state(block, weight=False, act=False)
    experts, few = _expert_policy(block, all_qlinears, arch, hidden, kwargs, config)
    job = BlockJob(name=name, block=block, qlinears={n: q for n, q in all_qlinears.items() if n not in few},
                   hidden=hidden, kwargs=kwargs, fp_hidden=fp_hidden, weight=config.weight is not None,
                   act=config.act is not None, kv=config.kv is not None,
                   forward=lambda h, kw: block_forward(block, h, kw),
                   outputs=lambda hs: _outputs(block, hs, kwargs),
                   edges=lambda **kinds: _edges(block, arch, model_config, hidden[0].device, **kinds))
    stats, fp_out = get_method(config.method).run(job, config.options)  # the algorithm calibrates job.qlinears
    if few and config.weight is not None:  # experts with too few calibration tokens: round to nearest
        stats.setdefault("layers", {}).update(rtn_block({n: all_qlinears[n] for n in few}))
    if experts:
        stats["experts"] = experts
    for lname, s in lorc_block(all_qlinears, config.lorc_rank, config.lorc_bits).items():  # LoRC after any algorithm
        stats.setdefault("layers", {}).setdefault(lname, {}).update(s)
    _check_finite(fp_out, f"the outputs of {name}")
    set_quant_state(block, weight=True, act=_any_act(config))
    q_out = _outputs(block, hidden, kwargs)
    stats["output_mse"] = _mse(q_out, fp_out)
    return stats, q_out, fp_out


@torch.no_grad()
def _expert_policy(block: nn.Module, qlinears: dict[str, QuantLinear], arch: Architecture | None,
                   hidden: list[torch.Tensor], kwargs: list[dict], config: QuantConfig) -> tuple[dict, set[str]]:
    """Mixture of experts: how many calibration tokens the router sends to each expert (one full-precision pass,
    summed over ranks) and the linears of experts below ``config.min_expert_tokens`` (rounded to nearest).
    Returns (report entry ``{"tokens": [per expert], "min_tokens", "rtn": [expert indices], "policy"}``, names);
    ({}, set()) for a block without experts."""
    if arch is None or arch.moe is None:
        return {}, set()
    index = {n: expert_index(n, arch) for n in qlinears}
    index = {n: e for n, e in index.items() if e is not None}
    if not index:
        return {}, set()
    first = {}
    for n, e in index.items():
        first.setdefault(e, n)  # one linear per expert sees every token routed to it
    counts = {e: 0 for e in first}
    hooks = [qlinears[n].register_forward_pre_hook(
        lambda _m, args, e=e: counts.__setitem__(e, counts[e] + args[0].shape[:-1].numel())) for e, n in first.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            block_forward(block, h, kw)
    finally:
        for hk in hooks:
            hk.remove()
    order = sorted(counts)
    totals = [int(c) for c in dist.sum_scalars([counts[e] for e in order])]
    low = {e: c for e, c in zip(order, totals) if c < config.min_expert_tokens}
    if low:
        log.warning("experts %s received fewer than %d calibration tokens (%s); rounding them to nearest",
                    list(low), config.min_expert_tokens, list(low.values()))
    entry = {"tokens": totals, "min_tokens": config.min_expert_tokens, "rtn": list(low),
             "policy": f"experts below {config.min_expert_tokens} calibration tokens: round to nearest"}
    return entry, {n for n, e in index.items() if e in low}


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters hold NaN/inf, naming the first such tensor (before calibration)."""
    for name, p in model.named_parameters():
        if not p.is_meta and not torch.isfinite(p).all():  # streamed weights are checked as they are read
            raise NumericsError(f"model weight {name} contains NaN or inf; the checkpoint is corrupt, re-export it "
                             "from a good copy")


def _check_finite(tensors: list[torch.Tensor], what: str) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NumericsError(f"{what} contain NaN or inf in full precision, before any quantization; the model "
                         "overflows on this data (try fp32: --device cpu, or other calibration data)")


def _any_act(config: QuantConfig) -> bool:
    """Whether any activation-side quantizer (linear inputs or KV cache) is on."""
    return config.act is not None or config.kv is not None


def _edges(block, arch, model_config, device, **kw):
    """Equivalence edges of ``block`` (on ``device``) and, per edge, the linear whose input initialises it."""
    edges = let_edges(block, arch, model_config, **kw)
    consumers = {}
    for e in edges:
        e.to(device)
        if e.consumer is not None:
            consumers[e.name] = block.get_submodule(e.consumer)
    return edges, consumers


def finalize_block(block: nn.Module, prefix: str) -> dict[str, QuantizedTensor]:
    """Replace QuantLinears by their deployable form: a plain Linear holding the dequantized weight, or (with
    activation quantization) a weight-float QuantLinear that still quantizes its input. Returns the frozen
    codes by qualified name (on the CPU)."""
    frozen = {}
    for name, q in list(quant_linears(block)):
        if q.frozen is not None:
            qt = q.frozen
            frozen[f"{prefix}.{name}"] = QuantizedTensor(qt.codes.cpu(), qt.scale.cpu(),
                                                         None if qt.zero is None else qt.zero.cpu(), qt.spec)
        lin = q.to_linear()
        new: nn.Module = lin
        if q.act_quantizer is not None:
            new = QuantLinear(lin, None, q.act_quantizer.spec)
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, new)
    return frozen


def quantize_model(model: nn.Module, arch: Architecture, config: QuantConfig, calib: torch.Tensor,
                   device: torch.device, progress: bool = True, checkpoint: Checkpoint | None = None,
                   stream: BlockStream | None = None, meter: MemoryMeter | None = None, offload: str = "device",
                   offload_dir: str | None = None, e2e_mode: str | None = None) -> QuantResult:
    """Quantize ``model`` in place. ``calib``: calibration token ids ``(nsamples, seqlen)``; under
    ``torch.distributed`` the same full set on every rank, of which each takes its share here
    (:func:`bitsmith.utils.dist.shard_samples`; ``config.batch_size`` is global).

    With ``checkpoint``, every finished block is recorded there and blocks it already holds are restored
    instead of recomputed (their outputs are recomputed to feed the next block), so a killed run resumes.
    With ``stream`` (a model streamed from disk, :mod:`bitsmith.models.streaming`), block ``i`` is materialised by
    ``stream.load(i)`` when its turn comes and handed to ``stream.done`` when finished. ``offload``: where the
    calibration activations live (``device``, ``host`` or ``disk`` under ``offload_dir``; see
    :class:`bitsmith.utils.memory.ActivationStore`). ``meter`` records per-block wall time and peak host /
    accelerator memory (``result.blocks``) and the overall peaks (``result.memory``). ``e2e_mode``: how a recipe's
    end-to-end stage runs (:data:`bitsmith.end_to_end.MODES`; default ``streamed`` for a streamed model, else
    ``whole``; the memory plan picks it in a CLI run).
    """
    if stream is not None and checkpoint is None and _e2e_config(config) is not None:
        with tempfile.TemporaryDirectory(dir=offload_dir) as tmp:  # streamed tuning reads the blocks back from it
            return quantize_model(model, arch, config, calib, device, progress, Checkpoint(Path(tmp) / "blocks", ""),
                                  stream, meter, offload, offload_dir, e2e_mode)
    start, cpu_start = time.perf_counter(), time.process_time()
    split_experts(model, arch)  # MoE: every expert's projections become linears (a no-op when already split)
    calib, local_batch = dist.shard_samples(calib, config.batch_size)  # this rank's share (all of it alone)
    done = _resume_point(checkpoint)
    if config.kv is not None:  # before capture: the attention masks depend on the attention implementation
        enable_kv_quant(model, arch, config.kv)
    check_finite_weights(model)
    inputs = capture_block_inputs(model, arch, calib, device, batch_size=local_batch)
    _check_finite(inputs.hidden, "the embeddings' outputs")
    hidden = as_store(inputs.hidden, device, offload, offload_dir)
    fp_hidden = copy_like(hidden) if config.learned() is not None else None  # trained methods target the fp model
    result = QuantResult()
    meter = meter or MemoryMeter(device)
    fp_hidden = _quantize_blocks(model, arch, config, inputs.with_hidden([]), hidden, fp_hidden, device, result,
                                 meter, done, checkpoint, stream, progress)
    e2e = _e2e_config(config)
    if e2e is not None:
        meter.start()
        before = rss_bytes()
        result.end_to_end = run_end_to_end(model, arch, calib, fp_hidden, device, e2e,
                                           e2e_mode or ("streamed" if stream is not None else "whole"),
                                           checkpoint, stream)
        result.end_to_end.update(meter.stop(), seconds=round(meter.last_seconds, 3))
        result.end_to_end["added_rss_mb"] = round(result.end_to_end["peak_rss_mb"] - before / 2**20, 1)
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    result.memory = meter.summary()
    return result


def _quantize_blocks(model: nn.Module, arch: Architecture, config: QuantConfig, inputs: BlockInputs,
                     hidden: Sequence[torch.Tensor], fp_hidden: Sequence[torch.Tensor] | None, device: torch.device,
                     result: QuantResult, meter: MemoryMeter, done: int, checkpoint: Checkpoint | None,
                     stream: BlockStream | None, progress: bool) -> Sequence[torch.Tensor] | None:
    """Every block in turn (the first ``done`` restored from ``checkpoint``), ``hidden`` its inputs (``inputs``:
    the kwargs); returns the full-precision chain's last outputs (None when not tracked)."""
    bar = tqdm(list(enumerate(get_blocks(model, arch))), desc=f"{config.method} {config.label}",
               disable=not progress or not dist.is_main(), unit="block")
    for i, block in bar:
        t0 = time.perf_counter()
        meter.start()
        reset_peak_memory(device)
        if stream is not None:
            block = stream.load(i)
        home = next(block.parameters()).device
        block.to(device)
        kw = inputs.block_kwargs(i)
        stats, hidden, fp_out = (_restore_block(block, config, checkpoint, i, hidden, kw, fp_hidden, result)
                                 if i < done else _quantize_and_finalize(block, config, checkpoint, i, hidden, kw,
                                                                         fp_hidden, result, arch, model.config))
        if fp_hidden is not None:
            fp_hidden = fp_out
        _release(block, home, stream, i, result, device)
        result.blocks.append({"block": i, **stats, "seconds": time.perf_counter() - t0,
                              "peak_memory_mb": peak_memory_bytes(device) / 2**20, **meter.stop()})
        bar.set_postfix(mse=f"{stats['output_mse']:.3g}")
        log.debug("block %d: output MSE %.4g", i, stats["output_mse"])
    return fp_hidden


def _e2e_config(config: QuantConfig) -> EndToEndConfig | None:
    """The end-to-end stage of a trained method's recipe (None: no such stage)."""
    rc = config.learned()
    return rc.end_to_end() if rc is not None else None


def _release(block: nn.Module, home: torch.device, stream: BlockStream | None, i: int, result: QuantResult,
             device: torch.device) -> None:
    """A finished block back where it lived (streamed: handed to the writer); the device cache emptied."""
    block.to(home)
    if stream is not None:
        stream.done(i, block, result)
    empty_cache(device)


def _resume_point(checkpoint: Checkpoint | None) -> int:
    """How many finished blocks ``checkpoint`` holds (the same on every rank; a fresh checkpoint is reset)."""
    dist.barrier()  # rank 0 may have just replaced the checkpoint folder (--overwrite)
    done = checkpoint.blocks_done() if checkpoint is not None else 0
    if dist.sum_scalars([done])[0] != done * dist.world_size():  # also: all have read it before rank 0 resets it
        raise CheckpointError(f"the processes see different checkpoints in {checkpoint.folder}; put the output on a "
                              "file system every process sees")
    if checkpoint is not None and done == 0 and dist.is_main():
        checkpoint.reset()
    elif done:
        log.warning("resuming: %d finished blocks restored from %s", done, checkpoint.folder)
    return done


def _quantize_and_finalize(block: nn.Module, config: QuantConfig, checkpoint: Checkpoint | None, i: int,
                           hidden: list[torch.Tensor], kwargs: list[dict], fp_hidden: list[torch.Tensor] | None,
                           result: QuantResult, arch: Architecture, model_config
                           ) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """Quantize block ``i``, replace its QuantLinears by their deployable form, record its codes and LoRC factors
    in ``result`` and (rank 0) in ``checkpoint``."""
    prefix = f"{arch.layers}.{i}"
    stats, hidden, fp_out = quantize_block(block, config, hidden, kwargs, fp_hidden, arch, model_config,
                                           name=f"block {i}", index=i)
    lorc = collect_factors(block, prefix)
    frozen = finalize_block(block, prefix)
    result.lorc.update(lorc)
    result.frozen.update(frozen)
    if checkpoint is not None and dist.is_main():
        checkpoint.save_block(i, block.state_dict(), frozen, lorc, stats)
    return stats, hidden, fp_out


def _restore_block(block: nn.Module, config: QuantConfig, checkpoint: Checkpoint, index: int,
                   hidden: list[torch.Tensor], kwargs: list[dict], fp_hidden: list[torch.Tensor] | None,
                   result: QuantResult) -> tuple[dict, list[torch.Tensor], list[torch.Tensor] | None]:
    """Load a finished block from ``checkpoint`` into ``block`` (still full precision) and recompute its
    outputs: the full-precision chain first (when tracked), then the quantized one."""
    fp_out = _outputs(block, fp_hidden, kwargs) if fp_hidden is not None else None
    state, frozen, lorc, stats = checkpoint.load_block(index)
    if config.act is not None:
        _wrap_activations(block, config.act)
    block.load_state_dict(state, strict=True)
    set_quant_state(block, weight=True, act=_any_act(config))
    result.frozen.update(frozen)
    result.lorc.update({n: LoRCFactors(a, b) for n, (a, b) in lorc.items()})
    return stats, _outputs(block, hidden, kwargs), fp_out


def apply_recipe_quant(model: nn.Module, arch: Architecture, recipe: dict) -> None:
    """Re-apply a finished run's activation and KV-cache quantization (``recipe``: the ``bitsmith.json`` recipe
    dict) to its written, ordinary-checkpoint model: what ``bitsmith eval`` and the streamed evaluation run."""
    if recipe.get("act"):
        apply_activation_quant(model, arch, spec_from_dict(recipe["act"]))
    if recipe.get("kv"):
        enable_kv_quant(model, arch, spec_from_dict(recipe["kv"]))


def apply_activation_quant(model: nn.Module, arch: Architecture, act: QuantSpec) -> int:
    """Wrap every block linear of an (already weight-quantized) model with an input quantizer. Returns count."""
    split_experts(model, arch)
    return sum(_wrap_activations(block, act) for block in get_blocks(model, arch))


def _wrap_activations(block: nn.Module, act: QuantSpec) -> int:
    """Give every linear of ``block`` an input quantizer (weights left as they are). Returns count."""
    names = list(find_linears(block))
    to_fake(block, names, lambda name, lin: (None, act))
    return len(names)
