"""QuantConfig: the full, versioned recipe of one quantization run (frozen, validated, JSON round trip).

Recipes are JSON files of :meth:`QuantConfig.to_dict`; the CLI builds the same object from flags. Unknown keys
and wrong types are rejected with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .algorithms.gptq import GPTQConfig
from .algorithms.omniquant import OmniQuantConfig
from .formats import QuantSpec, spec_from_dict

CONFIG_VERSION = 1
METHODS = ("rtn", "gptq", "omniquant")
NESTED = {"gptq": GPTQConfig, "omniquant": OmniQuantConfig}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    ``weight``/``act``: specs for linear weights and inputs (None: left in full precision).
    ``method``: weight algorithm. Calibration: ``nsamples`` windows of ``seqlen`` tokens from ``calib``.
    """

    method: str = "rtn"
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    omniquant: OmniQuantConfig = field(default_factory=OmniQuantConfig)
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of: {', '.join(METHODS)}")
        if self.weight is None and self.act is None:
            raise ValueError("nothing to quantize: set weight bits below 16 and/or activation bits below 16")
        for name in ("nsamples", "seqlen", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.nsamples % self.batch_size:
            raise ValueError(f"nsamples ({self.nsamples}) must be a multiple of batch_size ({self.batch_size})")

    @property
    def label(self) -> str:
        """Short setting name, e.g. ``W4A16g128``, ``W4A8`` (FP formats add their name)."""
        def part(prefix: str, spec: QuantSpec | None) -> str:
            if spec is None:
                return f"{prefix}16"
            s = f"{prefix}{spec.format.bits}"
            return s + (f"({spec.format.name})" if spec.format.is_float else "")
        g = getattr(self.weight.granularity, "group_size", None) if self.weight else None
        return part("W", self.weight) + part("A", self.act) + (f"g{g}" if g else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "method": self.method,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "act": None if self.act is None else self.act.to_dict(),
            "gptq": dataclasses.asdict(self.gptq),
            "omniquant": dataclasses.asdict(self.omniquant),
            "calib": self.calib,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Strict inverse of :meth:`to_dict` (unknown keys, wrong types and newer versions are errors)."""
        if not isinstance(d, dict):
            raise ValueError("a recipe must be a JSON object")
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(f"recipe version {version!r} is newer than this bitsmith ({CONFIG_VERSION}); upgrade")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        for key in ("weight", "act"):
            if d.get(key) is not None:
                d[key] = _spec(d[key], key)
        for key, cls_ in NESTED.items():
            if key in d:
                d[key] = _nested(cls_, d[key], key)
        _check_types(d)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ValueError(f"recipe file {p} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"recipe file {p} is not valid JSON ({e}); fix the file") from None


def _spec(d: Any, key: str) -> QuantSpec:
    try:
        return spec_from_dict(d)
    except (KeyError, TypeError) as e:
        raise ValueError(f"recipe key {key!r} is malformed ({e}); see recipes/*.json for the layout") from None


def _nested(cls_: type, value: Any, key: str) -> Any:
    """A nested options object (e.g. ``gptq``) from its JSON object, keys and value types checked."""
    fields = {f.name: f for f in dataclasses.fields(cls_)}
    if not isinstance(value, dict) or set(value) - set(fields):
        raise ValueError(f"recipe key {key!r} must be an object with keys from: {', '.join(sorted(fields))}")
    for name, v in value.items():
        default = fields[name].default
        ok = (isinstance(v, bool) if isinstance(default, bool)
              else isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(default, float)
              else isinstance(v, int) and not isinstance(v, bool) if isinstance(default, int) else True)
        if not ok:
            raise ValueError(f"recipe key {key}.{name} must be {type(default).__name__}, got {type(v).__name__}")
    return cls_(**value)


def _check_types(d: dict[str, Any]) -> None:
    types = {"method": str, "calib": str, "nsamples": int, "seqlen": int, "seed": int, "batch_size": int}
    for key, typ in types.items():
        if key in d and (not isinstance(d[key], typ) or isinstance(d[key], bool)):
            raise ValueError(f"recipe key {key!r} must be {typ.__name__}, got {type(d[key]).__name__}")
