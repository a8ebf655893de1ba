"""Streaming safetensors output: tensors are written as they become final, so the model is never whole in memory.

:class:`SafetensorsStream` writes one safetensors file incrementally: every tensor's bytes are appended to a data
file the moment it is added (host memory holds one tensor at a time), and :meth:`SafetensorsStream.close` writes
the header (names, dtypes, shapes, offsets) followed by the data. The result is an ordinary safetensors file.

:class:`ShardWriter` spreads a model's tensors over such files of at most ``max_shard_bytes`` each (a tensor
larger than the limit gets a shard of its own), staged in a folder, and :meth:`ShardWriter.finish_into` moves
them into the output folder under Hugging Face's names — ``model.safetensors`` for one shard, else
``model-0000i-of-0000n.safetensors`` plus the standard ``model.safetensors.index.json``
(``{"metadata": {"total_size", "total_parameters"}, "weight_map": {name: file}}``).

:class:`StreamedRun` ties a :class:`~bitsmith.models.streaming.StreamingModel` to a writer for
:func:`bitsmith.pipeline.quantize_model` (its ``stream`` argument): block ``i`` is read from disk when the
pipeline reaches it, written (and, with ``--pack``, its packed codes too) and released when it is finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ExportError
from ..models.streaming import StreamingModel
from ..utils import dist
from ..utils.memory import trim_host_memory

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # 5 GB, the Hub's usual shard size (transformers 5 itself defaults to 50 GB)
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_COPY_CHUNK = 2**20


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (contiguous, on the CPU), without copying them."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _append(out: Any, data: Any, size: int) -> None:
    """Copy ``size`` bytes of the open file ``data`` to the end of ``out`` inside the kernel where possible
    (``os.sendfile``), else in small chunks: no large buffer in this process."""
    sent = 0
    try:
        while sent < size:
            n = os.sendfile(out.fileno(), data.fileno(), sent, size - sent)
            if n == 0:
                break
            sent += n
    except (AttributeError, OSError):
        data.seek(sent)
        out.seek(0, os.SEEK_END)
        shutil.copyfileobj(data, out, _COPY_CHUNK)
        return
    if sent != size:
        raise OSError(f"short copy into {out.name}: {sent} of {size} bytes")


class SafetensorsStream:
    """One safetensors file written tensor by tensor (see the module docstring). ``size`` is the data size so far."""

    def __init__(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes now (it is moved to the CPU and made contiguous first, if needed)."""
        if name in self.entries:
            raise ValueError(f"tensor {name} was already written")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"cannot write {name}: safetensors has no dtype for {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        self.entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + n]}
        self._data.write(_tensor_bytes(t))
        self.size += n

    def close(self) -> Path:
        """Write the finished file (header, then the data) and delete the data file. Returns the path."""
        self._data.close()
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            out.flush()
            _append(out, data, self.size)
        os.replace(tmp, self.path)
        self._data_path.unlink()
        return self.path

    def abort(self) -> None:
        """Close and delete everything written so far."""
        self._data.close()
        self._data_path.unlink(missing_ok=True)


class ShardWriter:
    """A model's tensors in safetensors shards of at most ``max_shard_bytes`` (see the module docstring).

    ``folder``: staging folder, emptied at the first :meth:`add` (a killed run's leftovers are discarded).
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes < 1:
            raise ExportError(f"max shard size must be positive, got {max_shard_bytes} bytes")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[SafetensorsStream] = []
        self._started = False
        self.n_params = 0
        self.total_size = 0

    def _start(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self._started = True

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` (name → tensor), widest dtypes first so offsets stay aligned where they can."""
        if not self._started:
            self._start()
        for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
            n = t.numel() * t.element_size()
            shard = self._shards[-1] if self._shards else None
            if shard is None or (shard.size and shard.size + n > self.max_shard_bytes):
                shard = SafetensorsStream(self.folder / f"shard-{len(self._shards):05d}.safetensors")
                self._shards.append(shard)
            shard.add(name, t)
            self.n_params += t.numel()
            self.total_size += n

    @property
    def names(self) -> list[str]:
        return [name for shard in self._shards for name in shard.entries]

    def finish_into(self, dest: str | Path) -> list[Path]:
        """Close the shards and move them into ``dest`` under Hugging Face's names (+ the index when several)."""
        dest = Path(dest)
        if not self._shards:
            raise ValueError("no tensors were written; nothing to save")
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        paths = []
        weight_map: dict[str, str] = {}
        for shard, name in zip(self._shards, names):
            os.replace(shard.close(), dest / name)
            paths.append(dest / name)
            weight_map.update((k, name) for k in shard.entries)
        if n > 1:
            index = {"metadata": {"total_parameters": self.n_params, "total_size": self.total_size},
                     "weight_map": dict(sorted(weight_map.items()))}
            (dest / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self._shards = []
        shutil.rmtree(self.folder, ignore_errors=True)
        log.info("wrote %d tensors (%.1f MiB) in %d shard(s)", len(weight_map), self.total_size / 2**20, n)
        return paths

    def abort(self) -> None:
        """Delete the staged shards."""
        for shard in self._shards:
            shard.abort()
        self._shards = []
        shutil.rmtree(self.folder, ignore_errors=True)


def write_random_model(config: Any, folder: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight checkpoint of ``config`` (a transformers config with ``architectures`` set) in ``folder``,
    written tensor by tensor (never the whole model in memory): linear and embedding weights
    ``N(0, initializer_range²)``, norm weights ``1 + N(0, 0.1²)``, biases ``N(0, 0.02²)``. For scale tests and
    benchmarks. Returns ``folder``."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder / ".shards", max_shard_bytes)
    seen: set[int] = set()
    for name, t in skeleton.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied weights are stored once, as save_pretrained does
            continue
        seen.add(id(t))
        value = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * value
        else:
            value = value * (std if name.endswith("weight") else 0.02)
        writer.add({name: value.to(dtype)})
    writer.finish_into(folder)
    config.save_pretrained(folder)
    return folder


class StreamedRun:
    """The ``stream`` of :func:`bitsmith.pipeline.quantize_model` for a model read from disk block by block.

    :meth:`load` (block ``i``): the embeddings are released once capture is done (before block 0), then block
    ``i`` is read from the safetensors files. :meth:`done`: the finished block's tensors go to ``writer`` (and,
    with ``pack``, its packed codes to ``packed/quantized.safetensors``), its frozen codes leave ``result`` (they are not
    kept in memory), and the block goes back to the meta device; its norm parameters stay in ``held`` (a few
    vectors) until the end, where end-to-end tuning may have changed them. :meth:`finish_into` writes them and the
    tensors outside the blocks (embeddings, final norm, head; copied from the source, the final norm from
    ``held`` when tuned) and moves every file into the output folder.
    """

    def __init__(self, source: StreamingModel, writer: ShardWriter, pack: bool = False) -> None:
        from ..models import norm_parameter_names

        self.source = source
        self.writer = writer
        self.pack = pack
        self.norms = set(norm_parameter_names(source.model, source.arch))
        self.held: dict[str, torch.Tensor] = {}
        self._packed: SafetensorsStream | None = None
        self._packed_layers: dict[str, dict[str, Any]] = {}
        self._packed_bits = 0
        self._packed_weights = 0

    def load(self, index: int) -> nn.Module:
        if index == 0:
            self.source.release_front()
        return self.source.load_block(index)

    def done(self, index: int, block: nn.Module, result: Any) -> None:
        prefix = self.source.block_prefix(index)
        state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        self.held.update((k, state.pop(k).detach().clone()) for k in list(state) if k in self.norms)
        if dist.is_main():  # torchrun: every rank holds the same block; rank 0 alone writes
            self.writer.add({self.source.saved_name(k): v for k, v in state.items()})
        mine = [name for name in result.frozen if name.startswith(prefix + ".")]
        frozen = {name: result.frozen.pop(name) for name in mine}
        lorc = {name: result.lorc.pop(name) for name in list(result.lorc) if name.startswith(prefix + ".")}
        if self.pack and frozen and dist.is_main():
            self._pack(frozen, lorc)
        self.source.release(prefix)
        trim_host_memory()  # else glibc keeps each freed block's fragments and RSS creeps up block after block

    def load_ends(self) -> None:
        """Materialise the embeddings and the tail; the final norm's values join ``held``."""
        self.source.load_ends()
        for name in self.norms - set(self.held):
            self.held[name] = self.source.model.get_parameter(name).detach().clone()

    def release_ends(self) -> None:
        self.source.release_ends()

    def _pack(self, frozen: dict[str, Any], lorc: dict[str, Any]) -> None:
        from .packed import PACKED_NAME, PACKED_VERSION, _layer_entry, packed_layers

        if self._packed is None:
            self._packed = SafetensorsStream(self.writer.folder / PACKED_NAME,
                                             {"bitsmith_packed_version": str(PACKED_VERSION)})
        for name, p in packed_layers(self.source.model, frozen, lorc).items():
            for key, buf in p.named_buffers():
                if key != "bias" and buf is not None:
                    self._packed.add(f"{name}.{key}", buf)
            self._packed_layers[name] = _layer_entry(p)
            self._packed_bits += p.storage_bits()
            self._packed_weights += p.out_features * p.in_features

    def finish_into(self, dest: str | Path) -> None:
        """Write the non-block tensors, then move the shards (and the packed checkpoint) into ``dest``."""
        dest = Path(dest)
        if self._packed is not None:  # first: the writer removes its staging folder when it finishes
            from .packed import PACKED_CONFIG, PACKED_DIR, PACKED_NAME, PACKED_VERSION

            (dest / PACKED_DIR).mkdir(exist_ok=True)
            os.replace(self._packed.close(), dest / PACKED_DIR / PACKED_NAME)
            self._packed = None
            n = self._packed_weights
            body = {"version": PACKED_VERSION, "weights": PACKED_NAME, "layers": self._packed_layers,
                    "bits_per_weight": self._packed_bits / n if n else None}
            (dest / PACKED_DIR / PACKED_CONFIG).write_text(json.dumps(body, indent=2) + "\n")
        saved = {self.source.saved_name(k): v for k, v in self.held.items()}
        if dist.is_main():
            self.writer.add(saved)
        for name, tensor in self.source.iter_outside_blocks():
            if name not in saved:
                self.writer.add({name: tensor})
        self.writer.finish_into(dest)

    def abort(self) -> None:
        """Delete everything staged."""
        if self._packed is not None:
            self._packed.abort()
            self._packed = None
        self.writer.abort()
