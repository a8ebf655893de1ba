"""``bitsmith.quantize``: one quantization run as a library function — a local model folder, a
:class:`~bitsmith.config.QuantConfig` and an output folder in; the quantized model folder (safetensors +
``bitsmith.json`` + reports + packed codes) written atomically, its report returned. ``bitsmith quantize`` parses
its flags and calls this.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import QuantConfig
from .errors import CheckpointError, ConfigError
from .models import block_linears
from .plan import MemoryLimits, RunPlan
from .version import __version__

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to compute). ``device``: ``auto``, ``cpu`` or an accelerator name; ``stream``: read one
    block at a time from the safetensors files (None: when the loaded model would take more than half the host
    budget); ``max_memory``: budgets (:class:`~bitsmith.plan.MemoryLimits`; ``max_memory_text`` is how the user
    wrote them, for the report); ``offload_dir``: where calibration activations go that fit nowhere else;
    ``max_shard_bytes``: largest weight file of a streamed output; ``pack``: also write the packed codes;
    ``resume``/``overwrite``: the checkpoint ``OUTPUT.partial`` and an existing output; ``ppl``/``ppl_limit``:
    evaluate perplexity on these datasets (first N windows) after quantizing; ``data_dir``: dataset folder;
    ``e2e_mode``: how a recipe's end-to-end stage runs (``auto``: the memory plan's choice, else one of
    :data:`bitsmith.end_to_end.MODES`)."""

    device: str = "auto"
    stream: bool | None = None
    max_memory: MemoryLimits | None = None
    max_memory_text: str | None = None
    offload_dir: str | None = None
    max_shard_bytes: int = 5 * 10**9
    pack: bool = True
    resume: bool = False
    overwrite: bool = False
    ppl: tuple[str, ...] = ()
    ppl_limit: int | None = None
    data_dir: str | None = None
    progress: bool = True
    e2e_mode: str = "auto"

    def __post_init__(self) -> None:
        from .end_to_end import MODES

        if self.e2e_mode not in ("auto", *MODES):
            raise ConfigError(f"end-to-end mode must be auto or one of {', '.join(MODES)}, got {self.e2e_mode!r}")


def quantize(model_dir: str | Path, config: QuantConfig, output: str | Path, options: RunOptions | None = None
             ) -> dict[str, Any]:
    """Quantize the model in ``model_dir`` with ``config`` into ``output``; returns the report (``bitsmith.json``).

    Under ``torchrun`` every rank calls this; rank 0 alone writes (the others return an empty dict)."""
    import torch

    from .data import calibration_samples
    from .export.hf import check_output_dir
    from .models import get_architecture
    from .pipeline import quantize_model
    from .utils import dist
    from .utils.device import resolve_device

    opts = options or RunOptions()
    t_start = time.perf_counter()
    dist.check_shardable(config.nsamples, config.batch_size, dist.env_world_size())  # torchrun: global batches
    check_output_dir(output, opts.overwrite)
    device = dist.init_from_env(resolve_device(opts.device))  # torchrun: join the process group, pick a device
    plan = RunPlan(opts, device)  # memory meter (baseline RSS) and limits, from here on
    model, tokenizer = plan.open_model(str(model_dir))  # streamed from disk (meta skeleton) or loaded whole
    arch = get_architecture(model)
    _check_model(model, arch, config)
    plan.check_memory(config, model, arch)  # a block that cannot fit fails here; activation placement decided
    calib = calibration_samples(config.calib, tokenizer, config.nsamples, config.seqlen, seed=config.seed,
                                data_dir=opts.data_dir, order=config.calib_order)
    torch.manual_seed(config.seed)
    ckpt = _checkpoint(model_dir, output, config, calib, opts)
    sizes = size_summary(config, model, arch)  # before quantizing: block linears are still plain nn.Linear
    result = quantize_model(model, arch, config, calib, device, progress=opts.progress, checkpoint=ckpt,
                            **plan.pipeline_kwargs(ckpt.folder))
    writes = dist.is_main()
    dist.teardown()  # torchrun: the ranks agree on every weight now; rank 0 alone evaluates and writes
    if not writes:
        return {}
    report: dict[str, Any] = {
        "bitsmith_version": __version__, "source_model": str(Path(model_dir).resolve()),
        "label": config.label, "recipe": config.to_dict(), "seconds": round(result.seconds, 3),
        "cpu_seconds": round(result.cpu_seconds, 3), "blocks": result.blocks, **sizes,
        **({"end_to_end": result.end_to_end} if result.end_to_end else {}),
    }
    _write(model, tokenizer, output, report, result, plan, config, opts, device, t_start)
    ckpt.remove()
    return report


def _write(model, tokenizer, output, report: dict[str, Any], result, plan: RunPlan, config: QuantConfig,
           opts: RunOptions, device, t_start: float) -> None:
    """Evaluate (when asked) and write the output folder in one atomic step: weights, tokenizer, report,
    packed codes (a streamed run has packed them block by block already)."""
    from .eval.report import write_reports
    from .export.hf import save_quantized
    from .export.packed import save_packed
    from .models import get_architecture
    from .models.kvcache import disable_kv_quant

    names = list(opts.ppl)
    if names and plan.source is None:
        report["ppl"] = evaluate(model, tokenizer, names, config.seqlen, opts.ppl_limit, 1, device,
                                 opts.data_dir, opts.progress)
        model.to("cpu")
    disable_kv_quant(model, get_architecture(model))  # the saved folder is a plain HF model; the recipe has the KV spec
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)

    def amend(folder):  # once the weights are written: streamed perplexity on them, then the run's memory peaks
        ppl = {} if not names or plan.source is None else {"ppl": plan.streamed_ppl(
            folder, names, config.seqlen, opts.ppl_limit, config.to_dict(), opts.progress)}
        return {**ppl, **plan.report()}

    def writer(folder, body):
        write_reports(folder, body)
        if opts.pack and plan.source is None:
            save_packed(model, result.frozen, result.lorc, folder)

    save_quantized(model, tokenizer, output, report, overwrite=opts.overwrite, extra_writer=writer,
                   streamed=plan.streamed, amend=amend)


def _check_model(model, arch, config: QuantConfig) -> None:
    """Refuse, before calibrating, what the model cannot take: a longer context, impossible groups, LoRC ranks."""
    check_seqlen(model, config.seqlen)
    if config.weight is not None:
        for name, lin in block_linears(model, arch):
            config.weight.validate_for(lin.in_features, name)
    if config.lorc_rank:
        from .algorithms.lorc import check_rank

        for name, lin in block_linears(model, arch):
            check_rank(config.lorc_rank, lin.out_features, lin.in_features, name)


def check_seqlen(model, seqlen: int) -> None:
    """Refuse windows longer than the model's context."""
    from .models import model_context_length

    ctx = model_context_length(model.config)
    if seqlen > ctx:
        raise ConfigError(f"seqlen {seqlen} is larger than the model's context of {ctx} tokens; use --seqlen ≤ {ctx}")


def evaluate(model, tokenizer, names: list[str], seqlen: int, limit: int | None, batch_size: int, device,
             data_dir, progress: bool) -> dict[str, float]:
    """Perplexity of ``model`` on the test split of each dataset in ``names`` (GPTQ/OmniQuant protocol)."""
    from .data import eval_token_limit, eval_windows, load_tokens
    from .eval.perplexity import model_forward, perplexity

    model.to(device)
    out = {}
    for name in names:
        tokens = load_tokens(name, "test", tokenizer=tokenizer, data_dir=data_dir,
                             max_tokens=eval_token_limit(name, seqlen))
        windows = eval_windows(tokens, seqlen, limit)
        out[name] = perplexity(model_forward(model), windows, batch_size=batch_size, device=device,
                               progress=progress)
        log.info("%s perplexity: %.4f (%d windows of %d tokens)", name, out[name], windows.shape[0], seqlen)
    return out


def _checkpoint(model_dir, output, config: QuantConfig, calib, opts: RunOptions):
    """The run's checkpoint folder ``OUTPUT.partial``: resumed with ``resume``, replaced with ``overwrite``."""
    from .checkpoint import Checkpoint, fingerprint
    from .utils import dist

    out = Path(output)
    folder = out.with_name(out.name + ".partial")
    ckpt = Checkpoint(folder, fingerprint({"recipe": config.to_dict(), "model": str(Path(model_dir).resolve())},
                                          calib))
    if folder.exists() and not opts.resume:
        if not opts.overwrite:
            raise CheckpointError(f"an interrupted run left {folder}; pass --resume to continue it or --overwrite "
                                  "to start over")
        if dist.is_main():  # torchrun: one rank removes it; quantize_model waits for it
            ckpt.remove()
    if opts.resume and not folder.exists():
        log.warning("--resume: no checkpoint at %s; starting from the first block", folder)
    return ckpt


def size_summary(config: QuantConfig, model, arch) -> dict[str, Any]:
    """Bits per weight and size estimate (``report.json``): per block linear, codes + one fp16 scale per group
    (one per tensor for per-tensor) + one zero per group at the code width (asymmetric INT) + LoRC factors."""
    from .algorithms.lorc import lorc_extra_bits
    from .eval.report import size_summary as summary
    from .formats.packing import storage_bits

    rows = []
    for name, lin in block_linears(model, arch):
        out_f, in_f, spec = lin.out_features, lin.in_features, config.weight
        if spec is None:
            rows.append((name, out_f * in_f, storage_bits(out_f * in_f, 16, 0)))
            continue
        n_scales = 1 if spec.granularity.kind == "tensor" else out_f * spec.granularity.n_groups(in_f)
        n_zeros = n_scales if spec.format.has_zero_point else 0
        extra = lorc_extra_bits(out_f, in_f, config.lorc_rank, config.lorc_bits) if config.lorc_rank else 0
        rows.append((name, out_f * in_f, storage_bits(out_f * in_f, spec.format.bits, n_scales, 16, n_zeros,
                                                      spec.format.bits if n_zeros else 0, extra)))
    return summary(rows, sum(p.numel() for p in model.parameters()))

