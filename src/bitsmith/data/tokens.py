"""Token streams, calibration windows and evaluation windows (GPTQ/OmniQuant protocol).

Decisions callers should know:

- Text is joined per dataset (:data:`bitsmith.data.sources.DATASETS`; local text files use ``"\\n\\n"``) and the
  tokenizer is called **once** on the joined text with its default special tokens, exactly like GPTQ's
  ``tokenizer("\\n\\n".join(texts))``: for LLaMA-style tokenizers the stream starts with one BOS and has none
  elsewhere.
- Pre-tokenized ``.jsonl`` ids are used as they are (the tokenizer, if any, is ignored); the stream is the lines'
  ``input_ids`` concatenated in order.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .readers import Documents, read_documents
from .sources import ResolvedSource, resolve_source

log = logging.getLogger(__name__)

CALIB_ORDERS = ("random", "file")  # calibration_samples(order=...)


def load_tokens(source: str | Path, split: str, tokenizer: Any = None, data_dir: str | Path | None = None, *,
                max_tokens: int | None = None) -> torch.LongTensor:
    """The joined token stream of ``source``'s ``split``: a LongTensor of shape ``(N,)``.

    ``source`` is a dataset name, a ``.txt``/``.jsonl`` file or a directory of split files (see
    :func:`resolve_source`). Text needs a Hugging Face ``tokenizer``. ``max_tokens`` keeps only the first tokens
    (GPTQ's c4 evaluation keeps ``256 * seqlen``: pass :func:`eval_token_limit`).
    """
    if max_tokens is not None:
        _check_positive(max_tokens=max_tokens)
    src = resolve_source(source, split, data_dir)
    tokens = _stream(read_documents(_need_tokenizer(src, tokenizer)), src, tokenizer)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    log.info("%s: %d tokens", src.describe(), tokens.numel())
    return tokens


def calibration_samples(source: str | Path, tokenizer: Any, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir: str | Path | None = None, split: str = "train",
                        order: str = "random") -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` tokens: a LongTensor of shape ``(nsamples, seqlen)``.

    ``order="random"`` (default): randomness comes from a local ``random.Random(seed)`` (the global RNGs are
    untouched). Text and ragged data: GPTQ's sampler, a window starting at ``randint(0, N - seqlen - 1)`` of the
    joined stream. Pre-tokenized ``.jsonl`` whose every line holds at least ``seqlen`` ids: each window is the
    first ``seqlen`` ids of a line (so it starts where the sequence starts, e.g. at BOS), lines drawn without
    replacement while they last. ``order="file"``: no randomness, the same windows in file order: the first
    ``seqlen`` ids of the first ``nsamples`` lines (the official OmniQuant runner's protocol), or for text and
    ragged data the first ``nsamples`` consecutive windows of the stream.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    if order not in CALIB_ORDERS:
        raise DataError(f"unknown calibration order {order!r}; use one of {', '.join(CALIB_ORDERS)}")
    src = resolve_source(source, split, data_dir)
    docs = read_documents(_need_tokenizer(src, tokenizer))
    rng = random.Random(seed)
    if docs.ids is not None and min(map(len, docs.ids)) >= seqlen:
        if order == "file":
            return _first_lines(docs.ids, nsamples, seqlen, src)
        return _line_windows(docs.ids, nsamples, seqlen, rng)
    stream = _stream(docs, src, tokenizer)
    if order == "file":
        return _first_windows(stream, nsamples, seqlen)
    return _stream_windows(stream, nsamples, seqlen, rng)


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.LongTensor:
    """Non-overlapping windows of a ``(N,)`` stream: ``(min(N // seqlen, limit), seqlen)``, the tail dropped."""
    _check_positive(seqlen=seqlen)
    if limit is not None:
        _check_positive(limit=limit)
    if tokens.dim() != 1:
        raise DataError(f"eval_windows needs a 1-D token stream, got shape {tuple(tokens.shape)}; "
                        f"flatten it or use load_tokens")
    n = tokens.numel() // seqlen
    if n == 0:
        raise DataError(f"not enough evaluation tokens for one window: need ≥ {seqlen}, have {tokens.numel()}; "
                        f"use a smaller --seqlen or more data")
    if limit is not None:
        n = min(n, limit)
    return tokens[: n * seqlen].reshape(n, seqlen).clone()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _need_tokenizer(src: ResolvedSource, tokenizer: Any) -> ResolvedSource:
    """``src`` unchanged, or a DataError when it (possibly) holds text and there is no tokenizer."""
    if tokenizer is None and src.kind == "text":
        raise DataError(f"{src.describe()} is text and the model has no tokenizer; "
                        f"use a pre-tokenized .jsonl with input_ids")
    return src


def _stream(docs: Documents, src: ResolvedSource, tokenizer: Any) -> torch.LongTensor:
    """Concatenated ids of pre-tokenized lines, or the tokenizer's ids of the joined text: shape ``(N,)``."""
    if docs.ids is not None:
        return torch.tensor([t for line in docs.ids for t in line], dtype=torch.long)
    if tokenizer is None:
        raise DataError(f"{src.describe()} is text and the model has no tokenizer; "
                        f"use a pre-tokenized .jsonl with input_ids")
    assert docs.texts is not None
    ids = tokenizer(src.rule.separator.join(docs.texts), verbose=False)["input_ids"]
    if len(ids) == 0:
        raise DataError(f"{src.describe()} tokenized to no tokens; give a file with text in it")
    return torch.tensor(ids, dtype=torch.long)


def _line_windows(lines: list[list[int]], nsamples: int, seqlen: int, rng: random.Random) -> torch.LongTensor:
    order: list[int] = []
    while len(order) < nsamples:  # every line once per round, in a fresh random order
        order += rng.sample(range(len(lines)), len(lines))
    return torch.tensor([lines[i][:seqlen] for i in order[:nsamples]], dtype=torch.long)


def _first_lines(lines: list[list[int]], nsamples: int, seqlen: int, src: ResolvedSource) -> torch.LongTensor:
    if len(lines) < nsamples:
        raise DataError(f"{src.describe()} has {len(lines)} lines but calibration order 'file' takes the first "
                        f"{nsamples}; use --nsamples ≤ {len(lines)} or more data")
    return torch.tensor([line[:seqlen] for line in lines[:nsamples]], dtype=torch.long)


def _first_windows(tokens: torch.Tensor, nsamples: int, seqlen: int) -> torch.LongTensor:
    if tokens.numel() < nsamples * seqlen:
        raise DataError(f"not enough calibration tokens: calibration order 'file' takes {nsamples} consecutive "
                        f"windows of {seqlen} = {nsamples * seqlen} tokens, have {tokens.numel()}; use fewer "
                        f"--nsamples, a shorter --seqlen or more data")
    return tokens[: nsamples * seqlen].reshape(nsamples, seqlen).clone()


def _stream_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.LongTensor:
    n = tokens.numel()
    if n < seqlen + 1:
        raise DataError(f"not enough calibration tokens: need ≥ seqlen+1 = {seqlen + 1}, have {n}; "
                        f"use a smaller --seqlen or more calibration data")
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[i : i + seqlen] for i in starts])
