"""The contract of a weight algorithm, and the registry every method joins.

A method is one module that calls :func:`register` with a :class:`Method`: its name, its options type (the
recipe's ``options`` object; None when it has none), the default options, a block driver and, for the memory
planner, what it keeps alive while a block is quantized. The pipeline dispatches through :func:`get_method`; the
CLI lists :func:`method_names`. Adding an algorithm is one new module plus its import in
``bitsmith/algorithms/__init__.py`` (README "Adding a method").

A driver gets a :class:`BlockJob` (one decoder block, its calibration inputs, and callbacks from the layers above
that alone know how to call a Hugging Face block and where its equivalence edges are) and leaves every
QuantLinear in ``job.qlinears`` frozen (or calibrated), returning ``(block statistics with "layers", the
full-precision outputs the next block's targets come from)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import QuantizedTensor
from ..nn import QuantLinear
from ..transforms import Edge

BlockForward = Callable[[torch.Tensor, dict], torch.Tensor]
DEFAULT_METHOD = "bitsmith"


def weight_error(w: torch.Tensor, qt: QuantizedTensor) -> float:
    """Relative squared error ``‖W − Ŵ‖² / ‖W‖²`` of a frozen weight."""
    w = w.detach().float()
    return float((w - qt.dequantize().to(w.device)).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))


@dataclass(frozen=True)
class MemoryNeeds:
    """What a method keeps on the device besides the block's forward (see :func:`bitsmith.utils.memory.block_need`).

    ``gptq``: Hessians and the GPTQ solver's workspace (at most ``hessian_budget`` bytes of Hessians at once when
    given); ``trained``: autograd through the block and trained parameters (``rounding``: one per weight, else
    per group), ``batch`` calibration batches stacked per step, two more activation sets alive (the
    full-precision chain's inputs and the targets; three with ``aug_loss``); ``collected_tokens``: inputs
    collected per linear (AWQ)."""

    gptq: bool = False
    hessian_budget: int = 0
    trained: bool = False
    rounding: bool = False
    batch: int = 1
    aug_loss: bool = False
    collected_tokens: int = 0


@dataclass
class BlockJob:
    """One decoder block's quantization as a driver sees it.

    ``hidden``: the block's inputs from the quantized prefix, one ``(b, T, H)`` tensor per calibration batch;
    ``fp_hidden``: the full-precision model's inputs to this block (tracked for trained methods, else None);
    ``weight``/``act``/``kv``: whether weights, linear inputs and the KV cache are quantized. ``forward(h, kw)``:
    the block's own forward; ``outputs(hs)``: the block applied to every batch (no grad; stored like ``hs``);
    ``edges(**kinds)``: the block's equivalence edges on the inputs' device and, per edge, the linear whose input
    initialises it (:func:`bitsmith.models.edges.let_edges` keywords)."""

    name: str
    block: nn.Module
    qlinears: dict[str, QuantLinear]
    hidden: Sequence[torch.Tensor]
    kwargs: list[dict]
    fp_hidden: Sequence[torch.Tensor] | None
    weight: bool
    act: bool
    kv: bool
    forward: BlockForward
    outputs: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]
    edges: Callable[..., tuple[list[Edge], dict[str, nn.Module]]]


BlockDriver = Callable[[BlockJob, Any], tuple[dict, Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    """A registered weight algorithm.

    ``options``: its options dataclass (None: it takes none); ``default(act)``: the default options when the
    recipe gives none (``act``: whether linear inputs are quantized); ``run``: the block driver;
    ``needs(options)``: its memory needs; ``learned(options)``: the reconstruction recipe it trains with (None for
    methods that do not train: they need no full-precision targets); ``v1_key``: where a version-1 recipe kept
    its options."""

    name: str
    run: BlockDriver
    options: type | None = None
    default: Callable[[bool], Any] = lambda act: None
    needs: Callable[[Any], MemoryNeeds] = lambda options: MemoryNeeds()
    learned: Callable[[Any], Any] = lambda options: None
    v1_key: str | None = None
    summary: str = ""


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new). Returns it."""
    if method.name in _METHODS:
        raise RuntimeError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; use one of: {', '.join(method_names())}") from None


def method_names() -> tuple[str, ...]:
    """Registered method names, the default first."""
    return tuple(sorted(_METHODS, key=lambda n: (n != DEFAULT_METHOD, n)))


def plain_outputs(job: BlockJob) -> Sequence[torch.Tensor]:
    """The block's full-precision outputs on the quantized prefix's inputs (what untrained methods feed on)."""
    return job.outputs(job.hidden)
