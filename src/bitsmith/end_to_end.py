"""The end-to-end stage: how the quantized model is run while its norms are tuned (:mod:`bitsmith.algorithms.e2e`
is the algorithm: the KL objective and the training loop).

Modes, the first that fits chosen by the memory plan (:func:`bitsmith.utils.memory.end_to_end_need`):

``whole``
    the model on the device, autograd through every block, full ``(b, T, V)`` logits (fastest; most memory);
``checkpointed``
    the model on the device, run block by block with activation checkpointing at block boundaries: the forward
    keeps only each block's input ``(b, T, H)``, the backward recomputes one block at a time from it; the KL is
    computed in chunks of tokens (:func:`~bitsmith.algorithms.e2e.chunked_kl`), so no full logits exist;
``offloaded``
    as ``checkpointed`` with the blocks in host memory, each moved to the device for its forward and again, in
    reverse order, for its backward;
``streamed``
    as ``offloaded`` for a model streamed from disk (``--stream``): each block is read back from the run's
    checkpoint folder (:class:`bitsmith.checkpoint.Checkpoint`, where every finished block is recorded) when its
    turn comes and dropped afterwards; the tuned values go to the writer (``stream.held``).

In the block-by-block modes the tuned parameters live outside the blocks for the whole stage (device tensors the
optimizer owns) and each block borrows its own while it is on the device, so a block can be dropped and read
again without losing them. Same result as ``whole`` up to float rounding (same ops; other summation order).
Under ``torch.distributed`` each rank runs its share of the sequences; gradients are averaged.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from .algorithms.e2e import EndToEndConfig, LogitsObjective, chunked_kl, kl_loss, tune_end_to_end
from .checkpoint import Checkpoint
from .errors import ConfigError
from .models import (
    Architecture,
    block_forward,
    capture_block_inputs,
    final_hidden,
    get_blocks,
    head_logits,
    norm_parameter_names,
    resolve,
)
from .utils import dist
from .utils.device import autocast, empty_cache

log = logging.getLogger(__name__)

MODES = ("whole", "checkpointed", "offloaded", "streamed")
KL_CHUNK_BYTES = 256 * 2**20  # one chunk's fp32 logits: the KL's tokens per chunk follow from the vocabulary


def kl_chunk_tokens(vocab: int) -> int:
    """Tokens per KL chunk: one chunk's ``(tokens, V)`` fp32 logits within :data:`KL_CHUNK_BYTES` (at least 16)."""
    return max(16, KL_CHUNK_BYTES // (4 * vocab))


class _Blocks:
    """The quantized blocks as the stage sees them: :meth:`get` puts block ``i`` on the device holding the tuned
    parameters, :meth:`put` takes it away again (restoring its own parameter slots)."""

    def __init__(self, model: nn.Module, arch: Architecture, device: torch.device, mode: str,
                 tuned: dict[str, nn.Parameter], checkpoint: Checkpoint | None) -> None:
        self.layers = get_blocks(model, arch)
        self.device, self.mode, self.checkpoint = device, mode, checkpoint
        prefix = arch.layers + "."
        self.borrowed: list[list[tuple[str, nn.Parameter]]] = [[] for _ in self.layers]
        for name, p in tuned.items():
            if name.startswith(prefix):
                index, _, local = name[len(prefix):].partition(".")
                self.borrowed[int(index)].append((local, p))
        self._own: dict[tuple[int, str], nn.Parameter] = {}

    def get(self, i: int) -> nn.Module:
        block = self.layers[i]
        if self.mode == "streamed":
            assert self.checkpoint is not None
            block.load_state_dict(self.checkpoint.load_state(i, self.device), strict=True, assign=True)
            block.requires_grad_(False)
        elif self.mode == "offloaded":
            block.to(self.device)
        for local, p in self.borrowed[i]:
            self._own[(i, local)] = _swap(block, local, p)
        return block

    def put(self, i: int) -> None:
        block = self.layers[i]
        for local, _ in self.borrowed[i]:
            _swap(block, local, self._own.pop((i, local)))
        if self.mode == "streamed":
            block.to("meta")
        elif self.mode == "offloaded":
            block.to("cpu")


def _swap(module: nn.Module, name: str, new: nn.Parameter) -> nn.Parameter:
    """Put ``new`` in parameter slot ``name`` of ``module``; returns what was there."""
    parent, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    old = owner._parameters[leaf]
    owner._parameters[leaf] = new
    return old


class BlockwiseObjective:
    """The quantized model run block by block (modes ``checkpointed``, ``offloaded``, ``streamed``; see the module
    docstring). ``ids`` ``(n, T)`` on the device; ``teacher`` ``(n, T, H')``: the full-precision final hidden
    states (the LM head's inputs), on the device or the host."""

    def __init__(self, model: nn.Module, arch: Architecture, blocks: _Blocks, ids: torch.Tensor,
                 teacher: torch.Tensor, chunk: int) -> None:
        self.model, self.arch, self.blocks, self.ids, self.teacher, self.chunk = model, arch, blocks, ids, teacher, chunk
        self.device = ids.device
        self._pending: tuple | None = None

    def _head(self, z: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return head_logits(self.model, self.arch, z)

    def _teacher(self, units: list[int]) -> torch.Tensor:
        return self.teacher[units].to(self.device)

    def forward(self, units: list[int]) -> float:
        """No-grad pass over the blocks keeping each block's input, then the final norm and the chunked KL."""
        inputs = capture_block_inputs(self.model, self.arch, self.ids[units], self.device, batch_size=len(units))
        h, saved = inputs.hidden[0], []
        for i in range(len(self.blocks.layers)):
            block = self.blocks.get(i)
            saved.append(h)
            with torch.no_grad(), autocast(self.device):
                h = block_forward(block, h, inputs.kwargs_for(i, 0))
            self.blocks.put(i)
        h = h.detach().requires_grad_(True)
        with autocast(self.device):
            z = final_hidden(self.model, self.arch, h)
        loss, grad_z = chunked_kl(z, self._teacher(units), self._head, self.chunk, grad=True)
        self._pending = (inputs, saved, h, z, grad_z)
        return loss

    def backward(self) -> None:
        """Back through the final norm, then through each block in reverse, recomputed from its saved input."""
        assert self._pending is not None, "forward first"
        inputs, saved, h, z, grad_z = self._pending
        self._pending = None
        z.backward(grad_z)
        grad = h.grad
        for i in reversed(range(len(saved))):
            block = self.blocks.get(i)
            x = saved[i].detach().requires_grad_(i > 0)
            with autocast(self.device):
                out = block_forward(block, x, inputs.kwargs_for(i, 0))
            out.backward(grad)
            grad = x.grad
            self.blocks.put(i)
            saved[i] = None

    @torch.no_grad()
    def kl(self, units: list[int], batch: int) -> float:
        """Block-major: every block is put on the device once for all ``units`` (``batch`` sequences a batch)."""
        inputs = capture_block_inputs(self.model, self.arch, self.ids[units], self.device, batch_size=batch)
        hidden = list(inputs.hidden)
        for i in range(len(self.blocks.layers)):
            block = self.blocks.get(i)
            with autocast(self.device):
                hidden = [block_forward(block, h, inputs.kwargs_for(i, b)) for b, h in enumerate(hidden)]
            self.blocks.put(i)
        total = 0.0
        for b, h in enumerate(hidden):
            idx = units[b * batch:(b + 1) * batch]
            with autocast(self.device):
                z = final_hidden(self.model, self.arch, h)
            total += chunked_kl(z, self._teacher(idx), self._head, self.chunk)[0] * len(idx)
        return dist.mean_scalar(total / max(len(units), 1))


def run_end_to_end(model: nn.Module, arch: Architecture, calib: torch.Tensor, fp_last: Sequence[torch.Tensor],
                   device: torch.device, cfg: EndToEndConfig, mode: str, checkpoint: Checkpoint | None = None,
                   stream: Any = None) -> dict:
    """Tune the norms of the quantized ``model`` toward the full-precision next-token distribution in ``mode``.

    ``calib`` ``(n, T)``: this rank's calibration sequences; ``fp_last``: the full-precision last block's outputs,
    one ``(b, T, H)`` per batch of them (a list or an activation store). ``streamed`` needs ``checkpoint`` (the
    finished blocks) and ``stream`` (a :class:`~bitsmith.models.streaming.BlockStream` with ``load_ends``,
    ``release_ends`` and ``held``: the tuned parameters' values, which it writes). Returns the stage's report
    (:func:`~bitsmith.algorithms.e2e.tune_end_to_end`'s, plus ``mode`` and the KL chunk)."""
    if mode not in MODES:
        raise ConfigError(f"end-to-end mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "streamed" and (checkpoint is None or stream is None):
        raise ConfigError("streamed end-to-end tuning reads the finished blocks back from the run's checkpoint")
    names = norm_parameter_names(model, arch)
    home = next(model.parameters()).device if mode != "streamed" else None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)  # only the tuned norms get gradients (not the head or embeddings)
    if mode == "streamed":
        dist.barrier()  # rank 0 has recorded every block in the checkpoint
        stream.load_ends()
    try:
        for m in ([model] if mode in ("whole", "checkpointed") else _ends(model, arch)):
            m.to(device)
        keep = device if isinstance(fp_last, list) else torch.device("cpu")  # where the activations were kept
        with torch.no_grad():  # the teacher: the final norm before tuning, on the full-precision chain
            teacher = torch.cat([final_hidden(model, arch, h.to(device)).to(keep) for h in fp_last])
        info = _tune(model, arch, calib.to(device), teacher, device, cfg, mode, names, checkpoint, stream)
    finally:
        if mode == "streamed":
            stream.release_ends()
        else:
            model.to(home)
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, False))
        empty_cache(device)
    return {**info, "mode": mode}


def _ends(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """What runs outside the blocks: embeddings, rotary module, final norm, extra projections, LM head."""
    paths = [*arch.embeddings, *((arch.rotary,) if arch.rotary else ()), arch.final_norm, *arch.final_extra,
             arch.lm_head]
    return [m for m in (resolve(model, p) for p in paths) if m is not None]


def _tune(model: nn.Module, arch: Architecture, ids: torch.Tensor, teacher: torch.Tensor, device: torch.device,
          cfg: EndToEndConfig, mode: str, names: list[str], checkpoint: Checkpoint | None, stream: Any) -> dict:
    """Build the objective for ``mode`` and train; the kept values end in the model (or ``stream.held``)."""
    if mode == "whole":
        t = teacher.to(device)
        objective: Any = LogitsObjective(
            lambda x: model(input_ids=x, use_cache=False).logits,
            lambda idx: torch.log_softmax(head_logits(model, arch, t[idx]).float(), dim=-1), ids)
        return tune_end_to_end(objective, [model.get_parameter(n) for n in names], ids.shape[0], cfg)
    source = stream.held if mode == "streamed" else {n: model.get_parameter(n).detach() for n in names}
    tuned = {n: nn.Parameter(source[n].to(device, copy=True), requires_grad=False) for n in names}
    final = {n: p for n, p in tuned.items() if not n.startswith(arch.layers + ".")}
    chunk = kl_chunk_tokens(model.config.get_text_config().vocab_size)
    blocks = _Blocks(model, arch, device, mode, tuned, checkpoint)
    own = {n: _swap(model, n, p) for n, p in final.items()}  # the final norm borrows its tuned values too
    try:
        info = tune_end_to_end(BlockwiseObjective(model, arch, blocks, ids, teacher, chunk), list(tuned.values()),
                               ids.shape[0], cfg)
    finally:
        for n, p in own.items():
            _swap(model, n, p)
    with torch.no_grad():
        for n, p in tuned.items():
            if mode == "streamed":
                stream.held[n] = p.detach().cpu()
            else:
                model.get_parameter(n).copy_(p)
    return {**info, "kl_chunk_tokens": chunk}


__all__ = ["MODES", "BlockwiseObjective", "kl_chunk_tokens", "kl_loss", "run_end_to_end"]
