"""Save a quantized model as an ordinary Hugging Face folder (dequantized on-grid weights) + ``bitsmith.json``.

Writes go to a temporary sibling folder that is renamed into place at the end, so an interrupted run never
leaves a half-written output folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from ..errors import ExportError
from ..models import fused_experts, get_architecture

log = logging.getLogger(__name__)

REPORT_NAME = "bitsmith.json"
REPORT_VERSION = 1


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Validate an output folder before any work starts: refuse an existing one unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"output folder {out} already exists; choose another --output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a folder; choose another --output")
    return out


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``dest``; on success it replaces ``dest`` (renamed into place), on any
    error it is removed, so ``dest`` is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(model: nn.Module, tokenizer: Any, out: str | Path, report: dict[str, Any],
                   overwrite: bool = False,
                   extra_writer: Callable[[Path, dict[str, Any]], None] | None = None,
                   streamed: Any = None, amend: Callable[[Path], dict[str, Any]] | None = None) -> Path:
    """Write ``model`` (safetensors), its tokenizer (if any) and ``report`` as ``bitsmith.json`` to ``out``.

    ``extra_writer(folder, body)`` writes further files (e.g. ``report.json/md/png``) into the temporary folder
    before it is renamed into place, so they appear atomically with the model. ``streamed``: a
    :class:`~bitsmith.export.shards.StreamedRun` whose blocks are already written; its shards are moved in instead of
    ``model.save_pretrained`` (``model`` is then the meta skeleton; its config files are written the same way).
    ``amend(folder)``: called once the weights are in the temporary folder; its entries are added to ``report``
    (e.g. the perplexity of the written model)."""
    out = check_output_dir(out, overwrite)
    with atomic_folder(out) as tmp:
        if streamed is None:
            with fused_experts(model, get_architecture(model)):  # MoE: the checkpoint's own expert layout
                model.save_pretrained(tmp, safe_serialization=True)
        else:
            streamed.finish_into(tmp)
            _save_configs(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if amend is not None:
            report.update(amend(tmp))
        body = {"version": REPORT_VERSION, **report}
        (tmp / REPORT_NAME).write_text(json.dumps(body, indent=2) + "\n")
        if extra_writer is not None:
            extra_writer(tmp, body)
    log.info("wrote %s", out)
    return out


def _save_configs(model: nn.Module, folder: Path) -> None:
    """``config.json`` (+ ``generation_config.json``) as ``save_pretrained`` writes them, without the weights."""
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)


def read_report(folder: str | Path) -> dict[str, Any] | None:
    """The ``bitsmith.json`` of a quantized folder, or None for an ordinary model folder."""
    p = Path(folder) / REPORT_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{p} is corrupt ({e}); re-run bitsmith quantize to recreate it") from None
