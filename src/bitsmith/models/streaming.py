"""Stream a model from its safetensors files: the skeleton lives on the ``meta`` device (no memory), and each part is
read from disk only when it is used and put back on ``meta`` afterwards.

:class:`StreamingModel` builds the Hugging Face model from its config under ``torch.device("meta")``, indexes the
checkpoint's tensors from the files' headers, and :meth:`StreamingModel.materialize` loads one module's tensors
(each file opened memory-mapped with ``safe_open`` just for that read, then closed, so no mapping outlives the read)
onto the host, cast like ``from_pretrained(dtype=…)`` casts (floating tensors to the compute dtype). Buffers the
checkpoint does not hold are recomputed: the model-level rotary module is rebuilt from the config. Tied weights
(``lm_head`` ↔ ``embed_tokens``) resolve to the tensor they alias. Memory in use: one block (plus what the
quantization of that block needs), never the whole model.

Requirements: safetensors weights whose tensor names are the model's state-dict names (what ``save_pretrained``
writes); anything else is refused with a message saying to load the model normally.
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from .errors import ModelError
from .loading import _check_architecture, _load_tokenizer, _read_config
from .registry import get_architecture, get_blocks, resolve
from .walker import capture_block_inputs, final_logits, run_blocks

log = logging.getLogger(__name__)


class BlockStream(Protocol):
    """What :func:`bitsmith.pipeline.quantize_model` asks of a streamed model: ``load(i)`` returns block ``i``
    with real weights (on the host); ``done(i, block, result)`` takes the finished block away. For end-to-end
    tuning (:mod:`bitsmith.end_to_end`): ``load_ends()``/``release_ends()`` materialise and drop what runs outside
    the blocks, and ``held`` maps the norm parameters' qualified names to the values to write (kept out of the
    blocks' tensors when they are taken away, so the tuning can change them)."""

    held: dict[str, torch.Tensor]

    def load(self, index: int) -> nn.Module: ...

    def done(self, index: int, block: nn.Module, result: Any) -> None: ...

    def load_ends(self) -> None: ...

    def release_ends(self) -> None: ...


class WeightIndex:
    """Which safetensors file holds each tensor of a checkpoint, with dtypes and shapes (headers only)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            other = "pickled *.bin weights" if any(self.folder.glob("*.bin")) else "no safetensors files"
            raise ModelError(f"{self.folder} has {other}; streaming reads safetensors only: convert the weights "
                             "to safetensors or run without --stream")
        self.file_of: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        self.file_of[name] = path
                        self.meta[name] = (piece.get_dtype(), tuple(piece.get_shape()))
            except (SafetensorError, OSError, ValueError) as err:
                raise ModelError(f"weight file {path} is corrupt or truncated ({err}); download or copy it "
                                 "again") from err

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for ``names``, one file opened (memory-mapped) at a time, in file order."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in group:
                    yield name, handle.get_tensor(name)

    @property
    def file_bytes(self) -> int:
        """Total size of the weight files on disk."""
        return sum(p.stat().st_size for p in set(self.file_of.values()))


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
    return t.numel() * size


class StreamingModel:
    """A causal LM whose weights stay on disk until used (see the module docstring).

    ``model``: the skeleton (on ``meta`` except what is materialised), ``arch``: its architecture row,
    ``tokenizer``: loaded as :func:`~bitsmith.models.load_model` does (or None), ``dtype``: the compute dtype
    floating tensors are cast to (fp32 by default, as ``load_model`` on the CPU).
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist; pass a local folder (nothing is downloaded)")
        _check_architecture(folder, _read_config(folder))
        self.folder = folder
        self.dtype = dtype
        self.index = WeightIndex(folder)
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        model.config.use_cache = False
        if model.can_generate():  # as from_pretrained does: the folder's file, else one made from config.json
            try:
                model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
            except OSError:
                model.generation_config = GenerationConfig.from_pretrained(
                    str(folder), config_file_name="config.json", _from_model_config=True, local_files_only=True)
        self.model = model
        self.arch = get_architecture(model)
        self.aliases = self._aliases()
        self.to_source = self._source_names()
        self._outside = [k for k in model.state_dict() if k not in self.aliases and not self._in_blocks(k)]
        self._check_names()
        self.tokenizer = _load_tokenizer(folder)

    # ---- names ----------------------------------------------------------------------------------------------
    def _aliases(self) -> dict[str, str]:
        """State-dict names whose tensor is another name's (tied weights) → that first name."""
        first: dict[int, str] = {}
        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in first:
                out[name] = first[id(t)]
            else:
                first[id(t)] = name
        return out

    def _source_names(self) -> dict[str, str]:
        """Model state-dict name → checkpoint name, through transformers' own key renamings (as
        ``from_pretrained`` applies them, e.g. GPT-NeoX's ``embed_out`` → ``lm_head``); a key that needs more than a
        rename (a fused/split conversion) is refused."""
        try:
            from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
            from transformers.core_model_loading import rename_source_key
        except ImportError:  # transformers < 5: checkpoint names are the model's names
            return {k: k for k in self.index.file_of}
        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        meta = self.model.state_dict()
        prefix = getattr(self.model, "base_model_prefix", None)
        out = {}
        for key in self.index.file_of:
            name, converted = rename_source_key(key, renamings, converters, prefix, meta)
            if converted is not None:
                raise ModelError(f"{self.folder}: tensor {key!r} must be converted, not only renamed, to load; "
                                 "this checkpoint cannot be streamed: run without --stream")
            out[name] = key
        return out

    def saved_name(self, name: str) -> str:
        """The name ``save_pretrained`` writes for the model's state-dict entry ``name`` (its checkpoint name)."""
        return self.to_source.get(name, name)

    def _in_blocks(self, name: str) -> bool:
        return name.startswith(self.arch.layers + ".")

    def _source_key(self, name: str) -> str | None:
        """Checkpoint name holding the model's ``name`` (a tied name falls back to the tensor it aliases)."""
        if name not in self.to_source and name in self.aliases:
            name = self.aliases[name]
        return self.to_source.get(name)

    def _check_names(self) -> None:
        missing = [k for k in self.model.state_dict() if k not in self.aliases and k not in self.to_source]
        if missing:
            raise ModelError(f"{self.folder} has no tensor {missing[0]!r} (and {len(missing) - 1} more names the "
                             "model expects); this checkpoint uses other tensor names: run without --stream")

    def block_prefix(self, index: int) -> str:
        """Qualified name of block ``index``, e.g. ``model.layers.3``."""
        return f"{self.arch.layers}.{index}"

    @property
    def num_blocks(self) -> int:
        return len(get_blocks(self.model, self.arch))

    # ---- sizes ---------------------------------------------------------------------------------------------
    def module_bytes(self, path: str = "") -> int:
        """Bytes of the module at ``path`` (whole model for ``""``) once materialised in the compute dtype."""
        module = self.model.get_submodule(path) if path else self.model
        seen: set[int] = set()
        total = 0
        for t in chain(module.parameters(), module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += _tensor_bytes(t, self.dtype)
        return total

    # ---- materialise / release ---------------------------------------------------------------------------------
    def materialize(self, path: str) -> nn.Module:
        """Load the tensors of the module at ``path`` that are still on ``meta`` from disk (host memory). Returns it."""
        module = self.model.get_submodule(path) if path else self.model
        prefix = f"{path}." if path else ""
        todo = {name: t for name, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta}
        keys = {}
        for name in todo:
            full = prefix + name
            target = self.aliases.get(full)
            if target is not None and not self.model.get_parameter(target).is_meta:
                self._assign(module, name, self.model.get_parameter(target))  # tied to a loaded tensor: share it
                continue
            key = self._source_key(full)
            if key is None:
                raise ModelError(f"{full} is not in the checkpoint (a computed buffer?); this model cannot be "
                                 "streamed: run without --stream")
            keys[key] = name
        for key, tensor in self.index.read(list(keys)):
            name = keys[key]
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
                if not torch.isfinite(tensor).all():
                    raise ModelError(f"model weight {prefix + name} contains NaN or inf; the checkpoint is corrupt, "
                                     "re-export it from a good copy")
            if tuple(tensor.shape) != tuple(todo[name].shape):
                raise ModelError(f"{key} has shape {tuple(tensor.shape)} in {self.folder}, the config expects "
                                 f"{tuple(todo[name].shape)}; the checkpoint and config.json do not match")
            self._assign(module, name, tensor)
        return module

    @staticmethod
    def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            keep = isinstance(tensor, nn.Parameter)
            owner._parameters[leaf] = tensor if keep else nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            owner._buffers[leaf] = tensor

    def release(self, path: str) -> None:
        """Put the module at ``path`` back on ``meta`` (its memory is freed)."""
        (self.model.get_submodule(path) if path else self.model).to("meta")

    def _front_paths(self) -> list[str]:
        return [p for p in self.arch.embeddings if resolve(self.model, p) is not None]

    def load_front(self) -> None:
        """Materialise what runs before block 0: the embeddings, and the rotary module rebuilt from the config
        (its ``inv_freq`` buffers are computed, not stored)."""
        for path in self._front_paths():
            self.materialize(path)
        if self.arch.rotary is not None:
            rotary = resolve(self.model, self.arch.rotary)
            if rotary is not None and any(b.is_meta for b in rotary.buffers()):
                parent, _, leaf = self.arch.rotary.rpartition(".")
                setattr(self.model.get_submodule(parent), leaf, type(rotary)(self.model.config))

    def release_front(self) -> None:
        """Put the embeddings back on ``meta`` (calibration inputs are captured; the rotary module stays)."""
        for path in self._front_paths():
            self.release(path)

    def load_block(self, index: int) -> nn.Module:
        """Materialise block ``index`` and return it."""
        return self.materialize(self.block_prefix(index))

    def load_tail(self) -> None:
        """Materialise the final norm, any extra projection and the LM head (tied heads share the embedding)."""
        for path in (self.arch.final_norm, *self.arch.final_extra, self.arch.lm_head):
            if resolve(self.model, path) is not None:
                self.materialize(path)

    def load_ends(self) -> None:
        """Materialise everything outside the blocks (:meth:`load_front` and :meth:`load_tail`)."""
        self.load_front()
        self.load_tail()

    def release_ends(self) -> None:
        """Put the embeddings, final norm, extra projections and head back on ``meta``."""
        self.release_front()
        for path in (self.arch.final_norm, *self.arch.final_extra, self.arch.lm_head):
            if resolve(self.model, path) is not None:
                self.release(path)

    def iter_outside_blocks(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors outside the blocks (embeddings, final norm, head, …) under the names
        ``save_pretrained`` writes, as the model holds them (cast to the compute dtype), one at a time; tied
        duplicates are left out as ``save_pretrained`` does."""
        for key, tensor in self.index.read([self.to_source[name] for name in self._outside]):
            yield key, tensor.to(self.dtype) if tensor.is_floating_point() else tensor


@torch.no_grad()
def streamed_logits(source: StreamingModel, input_ids: torch.Tensor, device: torch.device | str,
                    batch_size: int = 1) -> Iterator[torch.Tensor]:
    """Logits of ``input_ids`` LongTensor (N, T), one ``(b, T, V)`` tensor per batch of ``batch_size`` rows, computed
    by streaming ``source`` block by block (every block read once for all rows; the rows' hidden states
    ``N × T × H`` stay on ``device``). Equal to the loaded model's logits (same ops in the same order)."""
    model, arch = source.model, source.arch
    source.load_front()
    inputs = capture_block_inputs(model, arch, input_ids, device, batch_size)
    source.release_front()
    for i in range(source.num_blocks):
        source.load_block(i)
        inputs = run_blocks(model, arch, inputs, device, start=i, stop=i + 1)
        source.release(source.block_prefix(i))
    source.load_tail()
    for hidden in inputs.hidden:
        yield final_logits(model, arch, hidden)
