"""Perplexity, GPTQ/OmniQuant protocol: non-overlapping windows, each scored on its ``T - 1`` shifted tokens.

``perplexity = exp(sum of token NLLs / number of predicted tokens)``, the NLL computed in fp32 from the logits of
each window on its own (no context carried between windows).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..utils.device import resolve_device

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]


def model_forward(model: torch.nn.Module) -> Forward:
    """Wrap a Hugging Face causal LM: ``ids (b, T)`` → ``logits (b, T, V)``, under ``no_grad``.

    Inputs are moved to the device of the model's first parameter; the cache is off.
    """
    if model.training:
        log.warning("model is in training mode (dropout active): perplexity may be wrong; call model.eval()")
    device = next(model.parameters()).device

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids.to(device), use_cache=False).logits

    return forward


def nll_per_window(forward: Forward, windows: torch.Tensor, batch_size: int = 1,
                   device: str | torch.device | None = None, progress: bool = False) -> torch.Tensor:
    """Mean NLL (nats) of each window's ``T - 1`` predicted tokens: float64 tensor of shape ``(n,)``.

    ``windows`` is ``(n, T)`` token ids; ``forward`` maps a ``(b, T)`` batch to ``(b, T, V)`` logits. With
    ``device`` set, each batch is moved there before ``forward``; otherwise it is passed as it is.
    """
    n, seqlen = _check_windows(windows, batch_size)
    target = None if device is None else resolve_device(device)
    out = torch.empty(n, dtype=torch.float64)
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size]
            batch = batch if target is None else batch.to(target)
            out[start : start + batch.shape[0]] = _batch_nll(forward(batch), batch)
    return out


def perplexity(forward: Forward, windows: torch.Tensor, batch_size: int = 1,
               device: str | torch.device | None = None, progress: bool = False) -> float:
    """``exp`` of the mean token NLL over all windows ``(n, T)`` (every window predicts ``T - 1`` tokens)."""
    nll = nll_per_window(forward, windows, batch_size=batch_size, device=device, progress=progress)
    mean = float(nll.mean())  # equal token counts per window: the mean of means is the token mean
    if not math.isfinite(mean):
        log.warning("perplexity is not finite (mean NLL %s): the model produced inf/NaN logits", mean)
    try:
        return math.exp(mean)
    except OverflowError:  # mean NLL above ~709.78 nats
        return math.inf


def _check_windows(windows: torch.Tensor, batch_size: int) -> tuple[int, int]:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (n ≥ 1, T ≥ 2), got {tuple(windows.shape)}; "
                         f"build them with bitsmith.data.eval_windows")
    if windows.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(windows.shape[0]), int(windows.shape[1])


def _batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Per-window mean NLL of ``batch (b, T)`` from ``logits (b, T, V)``, in fp32, returned on the CPU ``(b,)``."""
    b, seqlen = batch.shape
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (b, seqlen):
        raise ValueError(f"forward returned shape {tuple(logits.shape)} for input {(b, seqlen)}; "
                         f"it must return logits of shape (b, T, vocab)")
    labels = batch[:, 1:].to(logits.device, torch.long)
    nll = [F.cross_entropy(logits[i, :-1].float(), labels[i], reduction="mean") for i in range(b)]
    return torch.stack(nll).double().cpu()
