"""Load a Hugging Face causal LM (and its tokenizer, when present) from a local folder.

Everything a user can get wrong about the folder is checked before transformers sees it, so the error names the
problem and the fix in one line (:class:`ModelError`). Nothing is downloaded (``local_files_only=True``), and
``.bin`` pickles are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.device import default_dtype, resolve_device
from .errors import ModelError
from .moe import split_experts
from .registry import ARCHITECTURES, supported_architectures

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
)
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder} has no config.json; pass a Hugging Face model folder (config.json + weights)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{config_file} is not valid JSON ({err}); restore the file from the original model") from err
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} holds a {type(config).__name__}, not a JSON object; restore the file")
    return config


def _check_architecture(folder: Path, config: dict[str, Any]) -> str:
    names = config.get("architectures") or []
    name = names[0] if names else None
    if name not in ARCHITECTURES:
        raise ModelError(
            f"{folder / 'config.json'} declares architecture {name!r}, which bitsmith does not support; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return name


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise ModelError(
            f"{folder} has config.json but no weight files (*.safetensors or *.bin); copy the model's weights there"
        )
    return files


def _check_safetensors(files: list[Path]) -> None:
    """Open every safetensors file's header (cheap, memory-mapped) so damage is reported with the file's name."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(
                f"weight file {path} is corrupt or truncated ({err}); download or copy it again"
            ) from err


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return resolved


def _load_tokenizer(folder: Path) -> Any | None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        logger.info("no tokenizer files in %s; returning no tokenizer (use pre-tokenized data)", folder)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        logger.warning("tokenizer in %s could not be loaded (%s); returning no tokenizer", folder, err)
        return None


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, Any | None]:
    """Load ``(model, tokenizer or None)`` from a local model folder.

    ``device`` is where the model will be *run* (the walker moves one block at a time there): it picks the default
    dtype (fp32 for the CPU, fp16 for an accelerator) but the model is returned on the CPU, in eval mode, with
    ``config.use_cache = False``; a mixture of experts has its fused experts split into per-expert linears
    (:func:`bitsmith.models.split_experts`). Raises :class:`ModelError` for a missing folder, a folder without config.json or
    weights, an unsupported architecture, or a corrupt weight file.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder {folder} does not exist; pass a local folder (nothing is downloaded)")
    if not folder.is_dir():
        raise ModelError(f"{folder} is a file, not a model folder; pass the folder that holds config.json")
    config = _read_config(folder)
    name = _check_architecture(folder, config)
    files = _weight_files(folder)
    _check_safetensors(files)
    torch_dtype = _resolve_dtype(dtype, resolve_device(device))

    from transformers import AutoModelForCausalLM

    logger.info("loading %s from %s as %s", name, folder, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, local_files_only=True, weights_only=True
        )
    except pickle.UnpicklingError as err:
        pickles = ", ".join(str(p) for p in files if p.suffix == ".bin")
        raise ModelError(
            f"{pickles} hold Python objects besides tensors and are only ever loaded with weights_only=True; "
            "convert the weights to safetensors from a trusted copy"
        ) from err
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"could not load the model in {folder}: {err}".splitlines()[0]) from err
    model.eval()
    model.config.use_cache = False
    split_experts(model, ARCHITECTURES[name])  # MoE: one nn.Linear per expert and projection
    return model, _load_tokenizer(folder)


def model_context_length(config: Any) -> int:
    """Longest sequence the model was built for (``max_position_embeddings`` or its older aliases)."""
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"config has none of {CONTEXT_ATTRS}; pass the sequence length explicitly")
