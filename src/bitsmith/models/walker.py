"""Generic block walker: run any registered HF causal LM one decoder block at a time.

The walker never re-implements a block. It captures what the HF model passes to its blocks (hidden states plus
keyword arguments such as ``attention_mask``, ``position_ids``, ``position_embeddings``), then calls each HF
block's own ``forward`` with them. Only the modules in use sit on ``device``; the model itself stays where it is
(normally the CPU).

Capture (:func:`capture_block_inputs`): every block in the ``layers`` ModuleList is swapped for a weightless
stand-in whose forward pre-hook (``with_kwargs=True``) records the call; the last stand-in raises
:class:`_StopForward`, so the model's forward stops before the final norm and head. Stand-ins (not a hook on the
real block 0) are used because some configs pass different kwargs to different blocks (Qwen2's
``max_window_layers`` gives later blocks a sliding-window mask), and recording every block's call costs nothing
when the blocks do no work. The real blocks never leave their device during capture.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..utils.device import resolve_device
from .errors import ModelError
from .registry import Architecture, find_linears, get_architecture, get_blocks, resolve

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the last block stand-in to end the model's forward once every block's inputs are recorded."""


@dataclass
class BlockInputs:
    """What the decoder blocks receive, one entry per batch of calibration rows.

    ``hidden``: one Tensor (b, T, H) per batch, on the capture device (block 0's input, or later blocks' after
    :func:`run_blocks`). ``kwargs``: one dict per batch, the keyword arguments of block 0 (tensors on the device,
    no KV cache, ``use_cache=False``). ``layer_kwargs``: block index -> per-batch dicts, only for blocks whose
    kwargs differ from block 0's (e.g. Qwen2's sliding-window layers). When running block ``i`` always take its
    kwargs from :meth:`block_kwargs` (``i``) or :meth:`kwargs_for` (``i``, batch), never ``kwargs`` directly.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    layer_kwargs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    def block_kwargs(self, layer: int) -> list[dict[str, Any]]:
        """Per-batch keyword arguments of block ``layer`` (block 0's unless that block gets its own)."""
        return self.layer_kwargs.get(layer, self.kwargs)

    def kwargs_for(self, layer: int, batch: int) -> dict[str, Any]:
        """Keyword arguments block ``layer`` receives for batch ``batch``."""
        return self.block_kwargs(layer)[batch]

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """Same kwargs, new hidden states (e.g. the outputs of a block, as the inputs of the next)."""
        return BlockInputs(hidden=hidden, kwargs=self.kwargs, layer_kwargs=self.layer_kwargs)


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
        return tensor.device
    return None


@contextlib.contextmanager
def on_device(*modules: nn.Module | None, device: torch.device | str) -> Iterator[None]:
    """Move ``modules`` (None entries skipped) to ``device`` for the ``with`` body, then back where each was."""
    device = resolve_device(device)
    present = [m for m in modules if m is not None]
    homes = [_module_device(m) for m in present]
    for module in present:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(present, homes):
            if home is not None:
                module.to(home)


def iter_blocks(model: nn.Module, arch: Architecture | None = None) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(index, block)`` for every decoder block of ``model``, in order."""
    yield from enumerate(get_blocks(model, arch))


def block_linears(model: nn.Module, arch: Architecture) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(qualified name, linear)`` for every linear in the decoder blocks (``model.layers.3.mlp.up_proj``)."""
    for i, block in iter_blocks(model, arch):
        for name, lin in find_linears(block).items():
            yield f"{arch.layers}.{i}.{name}", lin


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Cache):
        return None  # a KV cache would grow across calls; blocks are always run without one
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _clean_kwargs(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {key: _to_device(value, device) for key, value in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


class _BlockStandIn(nn.Module):
    """Weightless placeholder for a decoder block during capture; the real block stays out of the module tree.

    Attribute look-ups it cannot answer go to the real block, so model code that reads block attributes works.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.__dict__["_real_block"] = block

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real_block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states  # (b, T, H): only the call's arguments matter


@contextlib.contextmanager
def _stand_ins(layers: nn.ModuleList, calls: list[tuple[tuple, dict]]) -> Iterator[None]:
    """Swap every block for a recording stand-in; the last one stops the forward. Restores the blocks."""
    real = list(layers)

    def record(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))
            if index == len(real) - 1:
                raise _StopForward

        return hook

    try:
        for i, block in enumerate(real):
            stand_in = _BlockStandIn(block)
            stand_in.register_forward_pre_hook(record(i), with_kwargs=True)
            layers[i] = stand_in
        yield
    finally:
        for i, block in enumerate(real):
            layers[i] = block


def _check_ids(input_ids: torch.Tensor, batch_size: int) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ModelError(
            f"input_ids must be a LongTensor (N, T), got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
        )
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")


def _capture_batch(
    model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One batch (b, T): block 0's hidden (b, T, H) and the kwargs of every block, in block order."""
    calls: list[tuple[tuple, dict]] = []
    with _stand_ins(layers, calls):
        try:
            model(input_ids=ids.to(device), use_cache=False)
        except _StopForward:
            pass
    if len(calls) != len(layers):
        raise ModelError(f"{type(model).__name__} called {len(calls)} of its {len(layers)} blocks; cannot walk it")
    per_layer = []
    for args, kwargs in calls:
        kwargs = dict(kwargs)
        if not args and "hidden_states" in kwargs:
            args = (kwargs.pop("hidden_states"),)
        if len(args) != 1:
            raise ModelError(
                f"{type(model).__name__} passes {len(args)} positional arguments to its blocks; "
                "the walker supports the hidden states only (everything else as keywords)"
            )
        per_layer.append((args[0], _clean_kwargs(kwargs, device)))
    hidden = per_layer[0][0]
    return hidden.to(device), [kw for _, kw in per_layer]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    arch: Architecture | None,
    input_ids: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 1,
) -> BlockInputs:
    """Inputs of decoder block 0 (and the kwargs of every block) for ``input_ids`` LongTensor (N, T).

    Runs the model's embeddings (and rotary module) on ``device`` in batches of ``batch_size`` rows; the blocks are
    not run. Returns :class:`BlockInputs` with ceil(N / batch_size) batches, hidden (b, T, H) on ``device``.
    The embeddings go back to their previous device afterwards.
    """
    arch = arch or get_architecture(model)
    _check_ids(input_ids, batch_size)
    device = resolve_device(device)
    layers = get_blocks(model, arch)
    if len(layers) == 0:
        raise ModelError(f"{type(model).__name__} has no decoder blocks at {arch.layers!r}; nothing to walk")
    front = [resolve(model, path) for path in (*arch.embeddings, *((arch.rotary,) if arch.rotary else ()))]
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []
    per_layer: dict[int, list[dict[str, Any]]] = {i: [] for i in range(1, len(layers))}
    with on_device(*front, device=device):
        for start in range(0, input_ids.shape[0], batch_size):
            h, layer_kwargs = _capture_batch(model, layers, input_ids[start : start + batch_size], device)
            hidden.append(h)
            kwargs.append(layer_kwargs[0])
            for i in per_layer:
                per_layer[i].append(layer_kwargs[i])
    differing = {
        i: batches for i, batches in per_layer.items()
        if not all(_same(a, b) for a, b in zip(batches, kwargs))
    }
    if differing:
        logger.debug("blocks %s receive kwargs different from block 0's", sorted(differing))
    return BlockInputs(hidden=hidden, kwargs=kwargs, layer_kwargs=differing)


def block_forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one HF decoder block's own forward: hidden (b, T, H) -> (b, T, H).

    Accepts blocks returning a tensor (transformers >= 5) or a tuple whose first item is the hidden states.
    Gradients flow (no ``no_grad`` here), so training algorithms can call it.
    """
    out = block(hidden, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def run_blocks(
    model: nn.Module,
    arch: Architecture | None,
    inputs: BlockInputs,
    device: torch.device | str,
    start: int = 0,
    stop: int | None = None,
) -> BlockInputs:
    """Run blocks ``start..stop-1`` on ``inputs`` (the inputs of block ``start``), one block on ``device`` at a time.

    Returns the outputs of block ``stop - 1`` as new :class:`BlockInputs` (hidden (b, T, H) per batch, same kwargs).
    """
    layers = get_blocks(model, arch or get_architecture(model))
    stop = len(layers) if stop is None else stop
    hidden = list(inputs.hidden)
    with torch.no_grad():
        for index in tqdm(range(start, stop), desc="blocks", leave=False, disable=None):
            with on_device(layers[index], device=device):
                for b, h in enumerate(hidden):
                    hidden[b] = block_forward(layers[index], h, inputs.kwargs_for(index, b))
    return inputs.with_hidden(hidden)


def final_logits(model: nn.Module, arch: Architecture | None, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, any extra projection (OPT ``project_out``) and the LM head: hidden (b, T, H) -> logits (b, T, V).

    The modules are moved to ``hidden``'s device for the call (a no-op when they are already there).
    """
    arch = arch or get_architecture(model)
    return head_logits(model, arch, final_hidden(model, arch, hidden))


def head_logits(model: nn.Module, arch: Architecture | None, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head and the row's final logit soft-cap ``c·tanh(z/c)`` (Gemma 2/3): (b, T, H') -> (b, T, V)."""
    arch = arch or get_architecture(model)
    head = resolve(model, arch.lm_head)
    with on_device(head, device=hidden.device):
        logits = head(hidden)
    cap = arch.softcap(model.config)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def final_hidden(model: nn.Module, arch: Architecture | None, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and any extra projection: the last block's output (b, T, H) -> the LM head's input (b, T, H')."""
    arch = arch or get_architecture(model)
    modules = [resolve(model, arch.final_norm), *(resolve(model, p) for p in arch.final_extra)]
    with on_device(*modules, device=hidden.device):
        for module in modules:
            if module is not None:
                hidden = module(hidden)
        return hidden


def norm_parameter_names(model: nn.Module, arch: Architecture | None = None) -> list[str]:
    """Qualified names of the normalisation layers' parameters (weights, LayerNorm biases): every block's norms
    that feed linears (``norm_to_linears``), its other norms (``other_norms``: Gemma's post-norms, q/k norms) and
    the final norm, in model order. The parameters end-to-end tuning trains."""
    arch = arch or get_architecture(model)
    names = [name for name, _ in arch.norm_to_linears] + list(arch.other_norms)
    paths = [f"{arch.layers}.{i}.{name}" for i in range(len(get_blocks(model, arch))) for name in names]
    paths.append(arch.final_norm)
    out = []
    for path in paths:
        module = resolve(model, path)
        if module is not None:
            out.extend(f"{path}.{leaf}" for leaf, _ in module.named_parameters(recurse=False))
    return out


def norm_parameters(model: nn.Module, arch: Architecture | None = None) -> list[nn.Parameter]:
    """The parameters named by :func:`norm_parameter_names`, in model order."""
    return [model.get_parameter(name) for name in norm_parameter_names(model, arch)]


@torch.no_grad()
def blockwise_logits(
    model: nn.Module,
    arch: Architecture | None,
    input_ids: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 1,
) -> torch.Tensor:
    """The model's logits for ``input_ids`` LongTensor (N, T), computed block by block: Tensor (N, T, V) on the CPU.

    Capture block 0's inputs, run every block with only that block on ``device``, then the final norm and head.
    Matches ``model(input_ids).logits`` (same ops in the same order); what evaluation of large models uses.
    """
    arch = arch or get_architecture(model)
    device = resolve_device(device)
    inputs = capture_block_inputs(model, arch, input_ids, device, batch_size)
    outputs = run_blocks(model, arch, inputs, device)
    tail = [resolve(model, arch.final_norm), *(resolve(model, p) for p in arch.final_extra), resolve(model, arch.lm_head)]
    with on_device(*tail, device=device):
        logits = [final_logits(model, arch, h).cpu() for h in outputs.hidden]
    return torch.cat(logits, dim=0)
