"""Reading documents from a :class:`ResolvedSource`: local ``.txt``/``.jsonl`` files or the hub (lazily)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .sources import HubSpec, ResolvedSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Documents:
    """The documents of one source: ``texts`` (strings to tokenize) or ``ids`` (pre-tokenized lines), not both."""

    texts: list[str] | None = None
    ids: list[list[int]] | None = None

    @property
    def pretokenized(self) -> bool:
        return self.ids is not None

    def head(self, n: int | None) -> Documents:
        """The first ``n`` documents (all when ``n`` is None)."""
        if n is None:
            return self
        return Documents(None if self.texts is None else self.texts[:n], None if self.ids is None else self.ids[:n])


def read_documents(src: ResolvedSource) -> Documents:
    """All documents of ``src`` (cut to ``src.rule.max_documents``); every reading problem is a DataError."""
    if src.path is None:
        docs = Documents(texts=_load_hub(src))
    elif src.kind == "jsonl":
        docs = _read_jsonl(src.path)
    else:
        docs = Documents(texts=_read_text(src.path))
    return docs.head(src.rule.max_documents)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line without its newline) for each line, decoded strictly as UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}; check the path and permissions")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append((number, line.removesuffix(b"\r").decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {number} is not valid UTF-8 (byte {exc.start}); "
                            f"re-save the file as UTF-8") from None
    return out


def _read_text(path: Path) -> list[str]:
    docs = [line for _, line in _read_lines(path)]
    if not any(d.strip() for d in docs):
        raise DataError(f"{path} is empty (no text); give a file with one document per line")
    return docs


def _read_jsonl(path: Path) -> Documents:
    texts: list[str] = []
    ids: list[list[int]] = []
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        key, value = _parse_record(path, number, line)
        if (key == "text" and ids) or (key == "input_ids" and texts):
            raise DataError(f"{path} line {number} has {key!r} but earlier lines have the other key; "
                            f"use either 'text' or 'input_ids' on every line")
        (texts if key == "text" else ids).append(value)
    if not texts and not ids:
        raise DataError(f"{path} is empty (no JSON lines); give one object with 'text' or 'input_ids' per line")
    return Documents(ids=ids) if ids else Documents(texts=texts)


def _parse_record(path: Path, number: int, line: str) -> tuple[str, Any]:
    """('input_ids', list of ints) or ('text', str) from one JSON line; input_ids win when both are present."""
    where = f"{path} line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg}); write one JSON object per line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is a JSON {type(obj).__name__}, not an object; write {{\"text\": ...}} "
                        f"or {{\"input_ids\": [...]}}")
    if "input_ids" in obj:
        value = obj["input_ids"]
        if not (isinstance(value, list) and value
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise DataError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
        return "input_ids", value
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return "text", obj["text"]
    raise DataError(f"{where} has neither 'text' nor 'input_ids' (keys: {', '.join(map(str, obj)) or 'none'}); "
                    f"give every line one of them")


def _load_hub(src: ResolvedSource) -> list[str]:
    """Documents from the Hugging Face hub; any failure is a DataError naming the paths tried on disk."""
    assert src.hub is not None and src.split is not None
    looked = ", ".join(map(str, src.tried)) if src.tried else "nowhere (no data directory given)"
    fix = (f"put the file there, point --data-dir / BITSMITH_DATA_DIR at a folder holding {src.name}/{src.split}"
           f".txt, or pip install datasets for the hub")
    try:
        import datasets  # optional dependency: pip install bitsmith[hub]
    except ImportError:
        raise DataError(f"dataset {src.name!r} split {src.split!r} not found on disk (looked at {looked}) and "
                        f"the 'datasets' package is not installed; {fix}") from None
    try:
        return _hub_texts(datasets, src.hub, src.split)
    except Exception as exc:  # noqa: BLE001 - network, cache and format errors all mean "not available"
        raise DataError(f"dataset {src.name!r} split {src.split!r} not found on disk (looked at {looked}) and the "
                        f"hub failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        f"{fix}") from exc


def _hub_texts(datasets: Any, hub: HubSpec, split: str) -> list[str]:
    hub_split = hub.splits[split]
    kwargs: dict[str, Any] = {"split": hub_split}
    if hub.data_files is not None:
        kwargs["data_files"] = {hub_split: hub.data_files[hub_split]}
    log.info("loading %s (%s) split %s from the Hugging Face hub", hub.path, hub.name or "default", hub_split)
    ds = datasets.load_dataset(hub.path, hub.name, **kwargs) if hub.name else datasets.load_dataset(
        hub.path, **kwargs)
    return list(ds[hub.field])
