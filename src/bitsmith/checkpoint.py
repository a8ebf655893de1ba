"""Layer-level resume: after every block, its final weights, frozen codes, LoRC factors and statistics are
written to a checkpoint folder, so a run killed at any moment resumes from the first unfinished block.

Layout of the folder (``OUT.partial`` beside the output folder)::

    state.json              {"version", "fingerprint", "blocks_done"}; replaced atomically after each block
    block_00003.safetensors the block's state dict ("state.*"), frozen codes ("frozen.<name>.codes|scale|zero")
                            and LoRC factors ("lorc.<name>.a|b[.codes|scale|zero]")
    block_00003.json        the block's statistics and the specs of its frozen tensors

Every file is written under a temporary name and renamed, and ``state.json`` is renamed last, so the folder
always describes a consistent prefix of finished blocks. The fingerprint (recipe + calibration tokens) guards
against resuming with different settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .formats import QuantizedTensor, spec_from_dict

log = logging.getLogger(__name__)

VERSION = 1


def fingerprint(recipe: dict[str, Any], calib: torch.Tensor) -> str:
    """Hash of the recipe and the calibration token ids: a checkpoint only resumes the same computation."""
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    h.update(calib.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def _atomic_json(path: Path, body: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)


def _put_qt(tensors: dict, meta: dict, key: str, qt: QuantizedTensor) -> None:
    tensors[f"{key}.codes"] = qt.codes.contiguous()
    tensors[f"{key}.scale"] = qt.scale.contiguous()
    if qt.zero is not None:
        tensors[f"{key}.zero"] = qt.zero.contiguous()
    meta[key] = qt.spec.to_dict()


def _get_qt(tensors: dict, meta: dict, key: str) -> QuantizedTensor:
    return QuantizedTensor(tensors[f"{key}.codes"], tensors[f"{key}.scale"], tensors.get(f"{key}.zero"),
                           spec_from_dict(meta[key]))


class Checkpoint:
    """A resumable run's checkpoint folder (see the module docstring)."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def blocks_done(self) -> int:
        """Finished blocks recorded in the folder (0 when absent); a different fingerprint is an error."""
        if not self.state_path.is_file():
            return 0
        try:
            state = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint {self.state_path} is corrupt ({e}); delete {self.folder} and start over")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"checkpoint {self.folder} was made with other settings or calibration data; "
                             "rerun with the same ones, or delete it (or pass --overwrite) to start over")
        return int(state.get("blocks_done", 0))

    def reset(self) -> None:
        """Start a fresh checkpoint (an existing folder is removed)."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        _atomic_json(self.state_path, {"version": VERSION, "fingerprint": self.fingerprint, "blocks_done": 0})

    def save_block(self, index: int, state: dict[str, torch.Tensor], frozen: dict[str, QuantizedTensor],
                   lorc: dict[str, Any], stats: dict) -> None:
        """Record block ``index`` as finished (its files first, then ``state.json``)."""
        tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        meta: dict[str, Any] = {}
        for name, qt in frozen.items():
            _put_qt(tensors, meta, f"frozen.{name}", qt)
        for name, f in lorc.items():
            for part in ("a", "b"):
                v = getattr(f, part)
                if isinstance(v, QuantizedTensor):
                    _put_qt(tensors, meta, f"lorc.{name}.{part}", v)
                else:
                    tensors[f"lorc.{name}.{part}"] = v.detach().cpu().contiguous()
        stem = self.folder / f"block_{index:05d}"
        tmp = stem.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, stem.with_suffix(".safetensors"))
        _atomic_json(stem.with_suffix(".json"), {"stats": stats, "specs": meta,
                                                 "frozen": sorted(frozen), "lorc": sorted(lorc)})
        _atomic_json(self.state_path, {"version": VERSION, "fingerprint": self.fingerprint,
                                       "blocks_done": index + 1})

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor],
                                              dict[str, tuple], dict]:
        """(state dict, frozen tensors, LoRC parts ``name → (a, b)``, statistics) of a finished block."""
        stem = self.folder / f"block_{index:05d}"
        tensors = load_file(str(stem.with_suffix(".safetensors")))
        body = json.loads(stem.with_suffix(".json").read_text())
        specs = body["specs"]
        state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        frozen = {n: _get_qt(tensors, specs, f"frozen.{n}") for n in body["frozen"]}
        lorc = {}
        for n in body["lorc"]:
            parts = []
            for part in ("a", "b"):
                key = f"lorc.{n}.{part}"
                parts.append(_get_qt(tensors, specs, key) if key in specs else tensors[key])
            lorc[n] = tuple(parts)
        return state, frozen, lorc, body["stats"]

    def load_state(self, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The state dict of finished block ``index`` alone, read straight onto ``device``."""
        from safetensors import safe_open

        path = self.folder / f"block_{index:05d}.safetensors"
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            return {k.removeprefix("state."): handle.get_tensor(k) for k in handle.keys() if k.startswith("state.")}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
