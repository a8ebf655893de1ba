"""Where data comes from: named datasets (a table of rules), local files and split directories.

:func:`resolve_source` turns a user's ``source`` (a dataset name, a ``.txt``/``.jsonl`` file or a directory of
split files) into a :class:`ResolvedSource`: the local path or hub dataset to read, the file kind, the split
actually used and the rule for joining documents into one text.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid"}
_EXTENSIONS = {".jsonl": "jsonl", ".txt": "text"}  # in order of preference: exact ids beat re-tokenized text
DATA_DIR_ENV = "BITSMITH_DATA_DIR"


@dataclass(frozen=True)
class JoinRule:
    """How documents become one token stream (GPTQ/OmniQuant protocol).

    ``separator`` joins the documents; ``max_documents`` keeps only the first documents (GPTQ's c4 evaluation
    uses the first 1100 validation documents; c4 calibration then also draws from the first 1100 documents of
    the train shard, where GPTQ samples whole documents from the full shard); ``eval_windows`` is the number of ``seqlen`` windows GPTQ's
    evaluation keeps (c4: 256), see :func:`eval_token_limit`.
    """

    separator: str
    max_documents: int | None = None
    eval_windows: int | None = None


@dataclass(frozen=True)
class HubSpec:
    """A Hugging Face ``datasets`` loader call: ``load_dataset(path, name, data_files=..., split=...)[field]``."""

    path: str
    name: str | None
    field: str
    splits: dict[str, str]  # bitsmith split -> hub split
    data_files: dict[str, str] | None = None  # hub split -> file inside the dataset repository


@dataclass(frozen=True)
class DatasetEntry:
    rule: JoinRule
    hub: HubSpec


_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
DATASETS: dict[str, DatasetEntry] = {
    "wikitext2": DatasetEntry(
        JoinRule("\n\n"),
        HubSpec("wikitext", "wikitext-2-raw-v1", "text", {"train": "train", "valid": "validation", "test": "test"}),
    ),
    "ptb": DatasetEntry(
        JoinRule(" "),
        HubSpec("ptb_text_only", "penn_treebank", "sentence",
                {"train": "train", "valid": "validation", "test": "test"}),
    ),
    "c4": DatasetEntry(  # GPTQ's c4 loader: first shards; c4 has no test split, evaluation uses validation
        JoinRule(" ", max_documents=1100, eval_windows=256),
        HubSpec("allenai/c4", None, "text", {"train": "train", "valid": "validation", "test": "validation"},
                data_files=_C4_FILES),
    ),
}
PLAIN_TEXT = JoinRule("\n\n")


@dataclass(frozen=True)
class ResolvedSource:
    """What to read for one ``(source, split)``.

    Exactly one of ``path`` (a local file) and ``hub`` (a ``datasets`` loader call) is set. ``kind`` is the file
    format (``"jsonl"`` may hold ``text`` or ``input_ids``); ``split`` is the split actually used (``None`` for a
    single file given directly); ``tried`` lists the local paths looked at, for error messages.
    """

    name: str
    kind: Literal["text", "jsonl"]
    split: str | None
    rule: JoinRule
    path: Path | None = None
    hub: HubSpec | None = None
    tried: tuple[Path, ...] = field(default=())

    def describe(self) -> str:
        """Short human description: the path, or the hub dataset and split."""
        if self.path is not None:
            return str(self.path)
        assert self.hub is not None
        return f"hub dataset {self.hub.path!r} ({self.hub.name or 'default'}, split {self.split})"


def normalize_split(split: str) -> str:
    """``train``/``valid``/``test`` (``validation``/``val``/``dev`` mean ``valid``); anything else is a DataError."""
    s = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if s not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return s


def resolve_source(source: str | Path, split: str, data_dir: str | Path | None = None) -> ResolvedSource:
    """Resolve a dataset name, a ``.txt``/``.jsonl`` file or a directory of split files.

    A ``str`` equal to a known name (``wikitext2``, ``ptb``, ``c4``; case-insensitive) is the named dataset, read
    from ``<data_dir>/<name>/<split>.jsonl`` or ``.txt`` (``data_dir`` argument, else ``$BITSMITH_DATA_DIR``),
    else from the Hugging Face hub when loaded. Anything else must be an existing path. ``train`` falls back to
    ``valid`` (with a warning) when only ``valid`` exists, for named datasets and directories alike.
    """
    split = normalize_split(split)
    if isinstance(source, str) and source.lower() in DATASETS:
        return _resolve_named(source.lower(), split, data_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_directory(path, split)
    if path.is_file():
        return _resolve_file(path)
    raise DataError(f"data source {str(source)!r} is not a known dataset ({', '.join(DATASETS)}) and the path "
                    f"{path} does not exist; give a dataset name or an existing .txt/.jsonl file or directory")


def eval_token_limit(source: str | Path, seqlen: int) -> int | None:
    """GPTQ's evaluation token budget for ``source``: ``256 * seqlen`` for ``c4``, ``None`` (everything) otherwise.

    Pass it as ``load_tokens(..., max_tokens=eval_token_limit(source, seqlen))`` to reproduce GPTQ's c4 numbers.
    """
    if isinstance(source, str) and source.lower() in DATASETS:
        windows = DATASETS[source.lower()].rule.eval_windows
        return None if windows is None else windows * seqlen
    return None


def _data_dir(data_dir: str | Path | None) -> Path | None:
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return None if chosen is None else Path(chosen).expanduser()


def _candidates(folder: Path, split: str) -> list[Path]:
    return [folder / f"{split}{ext}" for ext in _EXTENSIONS]


def _find_split(folder: Path, split: str, label: str) -> tuple[Path | None, str, list[Path]]:
    """First existing split file, trying ``valid`` after ``train``; returns (path, split used, paths tried)."""
    tried: list[Path] = []
    order = [split, "valid"] if split == "train" else [split]
    for s in order:
        for cand in _candidates(folder, s):
            tried.append(cand)
            if cand.is_file():
                if s != split:
                    log.warning("%s has no %r split (looked for %s); using %r instead", label, split,
                                ", ".join(map(str, tried[:-1])), s)
                return cand, s, tried
    return None, split, tried


def _resolve_named(name: str, split: str, data_dir: str | Path | None) -> ResolvedSource:
    entry = DATASETS[name]
    folder = _data_dir(data_dir)
    tried: list[Path] = []
    if folder is not None:
        path, used, tried = _find_split(folder / name, split, f"dataset {name!r}")
        if path is not None:
            return ResolvedSource(name, _EXTENSIONS[path.suffix], used, entry.rule, path=path, tried=tuple(tried))
    log.info("dataset %r split %r not found on disk; will use the Hugging Face hub", name, split)
    return ResolvedSource(name, "text", split, entry.rule, hub=entry.hub, tried=tuple(tried))


def _resolve_directory(path: Path, split: str) -> ResolvedSource:
    found, used, tried = _find_split(path, split, f"directory {path}")
    if found is None:
        raise DataError(f"directory {path} has no {split!r} split: tried {', '.join(map(str, tried))}; "
                        f"add one of these files or choose another split")
    return ResolvedSource(path.name, _EXTENSIONS[found.suffix], used, PLAIN_TEXT, path=found, tried=tuple(tried))


def _resolve_file(path: Path) -> ResolvedSource:
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file type {path.suffix!r} for {path}; use a .txt file (one document "
                        f"per line) or a .jsonl file with 'text' or 'input_ids'")
    return ResolvedSource(path.stem, kind, None, PLAIN_TEXT, path=path, tried=(path,))
