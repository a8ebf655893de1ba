"""The resources of one quantization run: streaming from disk, the memory plan checked before calibration,
activation offload, streamed evaluation of the written output, and the memory/time accounting (docs/scale.md).

:class:`RunPlan` is created at the start of :func:`bitsmith.run.quantize` (its
:class:`~bitsmith.utils.memory.MemoryMeter` takes the baseline RSS there), opens the model (streamed or loaded),
checks that one block fits the memory limit — asking the method what it keeps alive — and decides where the
calibration activations live, hands the pipeline its streaming arguments, evaluates perplexity on the written
output when streaming, and adds ``"memory"`` and ``"scale"`` to the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ResourceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("bitsmith.plan")

STREAM_FRACTION = 0.5  # stream when the loaded model would take more than this share of the host budget


@dataclass(frozen=True)
class MemoryLimits:
    """Budgets in bytes (None: what is free): ``compute`` for the compute device (host RAM on the CPU), or
    ``device`` and ``host`` separately. :meth:`resolve` gives the budgets that apply on a device: on the CPU both
    name the same pool, host RAM, and the tightest applies."""

    device: int | None = None
    host: int | None = None
    compute: int | None = None

    def resolve(self, accelerator: bool) -> MemoryLimits:
        if accelerator:
            return MemoryLimits(device=self.device or self.compute, host=self.host)
        sizes = [x for x in (self.host, self.device, self.compute) if x is not None]
        return MemoryLimits(host=min(sizes) if sizes else None)


def _floating_bytes(source_meta: dict[str, tuple[str, tuple[int, ...]]], elem: int) -> int:
    """Bytes of a checkpoint once loaded with floating tensors at ``elem`` bytes (integers as stored)."""
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    total = 0
    for dtype, shape in source_meta.values():
        n = 1
        for d in shape:
            n *= d
        total += n * (elem if dtype.startswith(("F", "BF")) else sizes.get(dtype, 4))
    return total


class RunPlan:
    """One ``quantize`` run's resource decisions and accounting (see the module docstring). ``opts``: a
    :class:`bitsmith.run.RunOptions` (``stream``, ``max_memory``, ``max_shard_bytes``, ``offload_dir``, ``pack``,
    ``data_dir``)."""

    def __init__(self, opts: Any, device: torch.device) -> None:
        from .utils.device import is_accelerator
        from .utils.memory import MemoryMeter, available_host_bytes

        self.opts = opts
        self.device = device
        self.accelerator = is_accelerator(device)
        self.meter = MemoryMeter(device)
        self.limits = (opts.max_memory or MemoryLimits()).resolve(self.accelerator)
        self.max_shard = opts.max_shard_bytes
        self.host_budget = self.limits.host or available_host_bytes()
        self.source = None  # StreamingModel when streaming
        self.streamed = None  # StreamedRun once quantizing
        self.placement = "device"
        self.e2e_mode: str | None = None  # how the recipe's end-to-end stage runs (the plan's choice)
        self.plan: dict[str, Any] = {}

    # ---- the model: streamed or loaded --------------------------------------------------------------------------
    def open_model(self, path: str):
        """``(model, tokenizer)``: a meta skeleton streamed from disk, or the whole model (logged either way)."""
        from .models import ModelError, load_model
        from .models.streaming import StreamingModel, WeightIndex
        from .utils.memory import format_bytes

        want = self.opts.stream
        if want is None:
            try:
                need = _floating_bytes(WeightIndex(path).meta, 4)
            except ModelError:  # no safetensors (or a bad folder): load_model reports it or loads .bin files
                need = None
            want = need is not None and need > STREAM_FRACTION * self.host_budget
            if need is not None:
                log.info("model needs %s loaded, host budget %s: %s", format_bytes(need),
                         format_bytes(self.host_budget),
                         "streaming it from disk block by block" if want else "loading it whole (--stream to stream)")
        if not want:
            return load_model(path)
        self.source = StreamingModel(path)
        log.info("streaming %s: %s on disk, one block (%s) in memory at a time", path,
                 format_bytes(self.source.index.file_bytes), format_bytes(self.source.module_bytes(
                     self.source.block_prefix(0))))
        return self.source.model, self.source.tokenizer

    # ---- the memory plan ------------------------------------------------------------------------------------------
    def check_memory(self, config, model, arch) -> None:
        """Fail now if one block cannot fit the limit; decide where the calibration activations live (logged)."""
        import torch

        from .algorithms import get_method
        from .models import find_linears, geometry, get_blocks
        from .utils import dist
        from .utils.memory import (
            accelerator_memory,
            activation_set_bytes,
            activation_sets,
            block_need,
            format_bytes,
        )

        geom = geometry(model.config, arch)
        elem = torch.empty((), dtype=next(model.parameters()).dtype).element_size()
        needs = get_method(config.method).needs(config.options)  # the method says what it keeps alive
        gran = getattr(config.weight, "granularity", None) if config.weight is not None else None
        worst: tuple[int, dict[str, int]] = (-1, {})
        for i, block in enumerate(get_blocks(model, arch)):
            lins = find_linears(block)
            linears = [(lin.out_features, lin.in_features) for lin in lins.values()] if config.weight else []
            parts = block_need(
                weight_bytes=sum(p.numel() * elem for p in block.parameters()), linears=linears,
                hidden=geom.hidden, intermediate=max([o for o, _ in linears] + [geom.hidden]), heads=geom.heads,
                batch=config.batch_size * needs.batch, seqlen=config.seqlen, elem=elem, gptq=needs.gptq,
                trained=needs.trained, rounding=needs.rounding, group_size=getattr(gran, "group_size", None),
                collected_tokens=needs.collected_tokens, hessian_budget=needs.hessian_budget)
            if sum(parts.values()) > sum(worst[1].values()):
                worst = (i, parts)
        index, parts = worst
        need = sum(parts.values())
        ranks = max(1, dist.env_world_size())  # torchrun: each rank holds its share of the samples
        acts = activation_sets(needs.trained, needs.aug_loss) * activation_set_bytes(
            -(-config.nsamples // ranks), config.seqlen, geom.hidden, elem)
        resident_host = 0 if self.source is not None else sum(p.numel() * elem for p in model.parameters())
        if self.accelerator:
            free = accelerator_memory(self.device)
            limit = self.limits.device or (free[0] if free else None)
            host_left = self.host_budget - resident_host
        else:
            limit = self.host_budget - resident_host
            host_left = limit
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
        self.plan = {"block": index, "block_need_mb": round(need / 2**20, 1), "block_need_parts_mb":
                     {k: round(v / 2**20, 1) for k, v in parts.items()}, "activations_mb": round(acts / 2**20, 1),
                     "limit_mb": None if limit is None else round(limit / 2**20, 1)}
        if limit is not None and need > limit:
            self._refuse_block(index, need, detail, limit)
        self.placement = self._place(need, acts, limit, host_left)
        self.plan["activations"] = self.placement
        self.e2e_mode = self._plan_end_to_end(config, model, arch, geom, elem, limit)
        log.info("memory plan: block %d needs ~%s (%s); calibration activations ~%s → %s", index,
                 format_bytes(need), detail, format_bytes(acts),
                 {"device": "kept on the compute device", "host": "offloaded to host memory",
                  "disk": f"offloaded to {self.opts.offload_dir}"}[self.placement])

    def _plan_end_to_end(self, config, model, arch, geom, elem: int, limit: int | None) -> str | None:
        """The end-to-end stage's mode: the first of whole, checkpointed, offloaded (streamed for a streamed model)
        whose estimate fits ``limit`` (or the one asked for); recorded in the plan, logged. None: no such stage."""
        from .end_to_end import kl_chunk_tokens
        from .models import find_linears, get_blocks
        from .utils import dist
        from .utils.memory import end_to_end_need, format_bytes

        rc = config.learned()
        cfg = rc.end_to_end() if rc is not None else None
        if cfg is None:
            return None
        units = -(-config.nsamples // max(1, dist.env_world_size()))
        blocks = get_blocks(model, arch)
        block_bytes = max(sum(p.numel() * elem for p in b.parameters()) for b in blocks)
        all_bytes = sum(p.numel() * elem for p in model.parameters())
        vocab = model.config.get_text_config().vocab_size
        resident = self.accelerator or self.source is not None  # on the CPU a loaded model is in memory already
        kw = dict(model_bytes=all_bytes if resident else 0, block_bytes=block_bytes,
                  ends_bytes=all_bytes - len(blocks) * block_bytes if self.source is None else
                  sum(self.source.module_bytes(p) for p in _end_paths(model, arch)),
                  layers=len(blocks), hidden=geom.hidden, heads=geom.heads,
                  intermediate=max([lin.out_features for lin in find_linears(blocks[0]).values()] + [geom.hidden]),
                  vocab=vocab, batch=min(cfg.batch, max(units - cfg.holdout, 1)), seqlen=config.seqlen,
                  units=units, elem=elem, chunk=kl_chunk_tokens(vocab), teacher_on_device=self.placement == "device")
        modes = ["streamed"] if self.source is not None else (
            ["whole", "checkpointed", "offloaded"] if self.accelerator else ["whole", "checkpointed"])
        if self.opts.e2e_mode != "auto":
            self._check_e2e_mode(self.opts.e2e_mode)
            modes = [self.opts.e2e_mode]
        needs = {m: end_to_end_need(m, **kw) for m in modes}
        fits = [m for m in modes if limit is None or sum(needs[m].values()) <= limit]
        mode = fits[0] if fits else modes[-1]
        parts = needs[mode]
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
        self.plan["end_to_end"] = {"mode": mode, "need_mb": round(sum(parts.values()) / 2**20, 1),
                                   "need_parts_mb": {k: round(v / 2**20, 1) for k, v in parts.items()}}
        if not fits:
            raise ResourceError(f"end-to-end tuning needs ~{format_bytes(sum(parts.values()))} ({detail}) in its "
                                f"leanest mode ({mode}) but the limit is {format_bytes(max(limit or 0, 0))}; lower "
                                "--batch-size or --seqlen, raise --max-memory, or pass --e2e-steps 0 to skip it")
        log.info("memory plan: end-to-end tuning %s, ~%s (%s)", mode, format_bytes(sum(parts.values())), detail)
        return mode

    def _check_e2e_mode(self, mode: str) -> None:
        streamed = self.source is not None
        if (mode == "streamed") != streamed:
            raise ConfigError(f"--e2e-mode {mode} " + ("needs --stream" if mode == "streamed" else
                                                      "cannot run on a streamed model: use streamed or auto"))

    def _refuse_block(self, index: int, need: int, detail: str, limit: int) -> None:
        from .utils.memory import format_bytes

        where = "device" if self.accelerator else "host"
        fix = ("raise --max-memory, use a device with more memory, or lower --batch-size/--seqlen"
               if self.source is not None or self.accelerator else
               "pass --stream (the whole model is loaded now), raise --max-memory, or lower --batch-size/--seqlen")
        raise ResourceError(f"block {index} needs ~{format_bytes(need)} ({detail}) but the {where} limit is "
                            f"{format_bytes(max(limit, 0))}; {fix}")

    def _place(self, need: int, acts: int, limit: int | None, host_left: int) -> str:
        from .utils.memory import format_bytes

        if limit is None or need + acts <= limit:
            return "device"
        if self.accelerator and acts <= host_left:
            return "host"
        if self.opts.offload_dir:
            return "disk"
        raise ResourceError(f"calibration activations need ~{format_bytes(acts)} beside the block's "
                         f"~{format_bytes(need)}, more than the {format_bytes(max(limit, 0))} limit"
                         + ("" if not self.accelerator else " and the host memory left")
                         + "; pass --offload-dir DIR, lower --nsamples/--seqlen, or raise --max-memory")

    # ---- quantizing, evaluating, saving -----------------------------------------------------------------------------
    def pipeline_kwargs(self, checkpoint_folder: Path) -> dict[str, Any]:
        """Keyword arguments for :func:`bitsmith.pipeline.quantize_model`."""
        if self.source is not None:
            from .export.shards import ShardWriter, StreamedRun

            writer = ShardWriter(Path(checkpoint_folder) / "shards", self.max_shard)
            self.streamed = StreamedRun(self.source, writer, pack=self.opts.pack)
            self.source.load_front()
        return {"stream": self.streamed, "meter": self.meter, "offload": self.placement,
                "offload_dir": self.opts.offload_dir, "e2e_mode": self.e2e_mode}

    def streamed_ppl(self, folder: Path, names: list[str], seqlen: int, limit: int | None, recipe: dict,
                     progress: bool) -> dict[str, float]:
        """Perplexity of the written output ``folder``, streamed block by block again (the quantized model is not
        in memory); activation/KV quantization from ``recipe`` re-applied as ``bitsmith eval`` does."""
        from .data import eval_token_limit, eval_windows, load_tokens
        from .eval.perplexity import perplexity
        from .models.streaming import StreamingModel, streamed_logits
        from .pipeline import apply_recipe_quant

        out = {}
        for name in names:
            source = StreamingModel(folder)
            apply_recipe_quant(source.model, source.arch, recipe)
            tokens = load_tokens(name, "test", tokenizer=source.tokenizer, data_dir=self.opts.data_dir,
                                 max_tokens=eval_token_limit(name, seqlen))
            windows = eval_windows(tokens, seqlen, limit)
            replay = _Replay(windows, streamed_logits(source, windows, self.device, batch_size=1))
            out[name] = perplexity(replay, windows, batch_size=1, progress=progress)
            log.info("%s perplexity: %.4f (%d windows of %d tokens, streamed)", name, out[name], windows.shape[0],
                     seqlen)
        return out

    def report(self) -> dict[str, Any]:
        """``"memory"`` (overall peaks since the run started, MiB) and ``"scale"`` (streaming, plan) for the report."""
        return {"memory": self.meter.summary(),
                "scale": {"streamed": self.source is not None, "max_memory": self.opts.max_memory_text, **self.plan}}


def _end_paths(model, arch) -> list[str]:
    """Paths of the modules outside the blocks that exist in ``model`` (embeddings, final norm, extras, head)."""
    from .models import resolve

    paths = [*arch.embeddings, arch.final_norm, *arch.final_extra, arch.lm_head]
    return [p for p in paths if resolve(model, p) is not None]


class _Replay:
    """A perplexity ``forward`` that hands out logits computed beforehand, batch by batch, checking each batch is
    the one they were computed for."""

    def __init__(self, windows: torch.Tensor, logits) -> None:
        self.windows, self.logits, self.next = windows, logits, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        import torch

        expected = self.windows[self.next : self.next + ids.shape[0]]
        if not torch.equal(ids.cpu(), expected):
            raise RuntimeError("streamed perplexity: batches out of order")
        self.next += ids.shape[0]
        return next(self.logits)
