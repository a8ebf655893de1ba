"""QuantConfig: the full, versioned recipe of one quantization run (frozen, validated, JSON round trip).

Recipes are JSON files of :meth:`QuantConfig.to_dict`; the CLI builds the same object from flags. Unknown keys
and wrong types are rejected with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .algorithms import DEFAULT_METHOD, get_method, method_names
from .errors import ConfigError
from .formats import QuantSpec, spec_from_dict

CONFIG_VERSION = 2  # 2: the chosen method's options under "options" (1: every method's options at the top level)
CALIB_ORDERS = ("random", "file")  # bitsmith.data.calibration_samples(order=...); config may not import data


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    ``weight``/``act``: specs for linear weights and inputs; ``kv``: keys and values after RoPE, per token and
    head (None: left in full precision).
    ``method``: weight algorithm, a registered name (:func:`bitsmith.algorithms.method_names`; default
    ``bitsmith``, the default recipe); ``options``: that method's options object (its registered type, e.g.
    :class:`~bitsmith.algorithms.gptq.GPTQConfig`; None for ``rtn``), filled with the method's default for this
    setting when not given (the default recipe learns LET too when activations are quantized).
    Calibration: ``nsamples`` windows of ``seqlen`` tokens from ``calib``.
    ``lorc_rank``/``lorc_bits``: LoRC low-rank error compensation after the weight algorithm (ZeroQuant-V2/FP;
    rank 0 = off; ``lorc_bits`` None = fp16 factors, 2–8 = symmetric integer factors, e.g. 8).
    ``min_expert_tokens``: mixture-of-experts policy. Each expert's linears are calibrated on the tokens the router
    sends to them; an expert that received fewer calibration tokens than this is rounded to nearest (min/max)
    instead (GPTQ: no Hessian from so few tokens; learned recipes: its rounding and clipping are not trained, the
    block's LET still applies), listed with its token count in the report.
    """

    method: str = DEFAULT_METHOD
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    kv: QuantSpec | None = None
    options: Any = None
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib_order: str = "random"
    batch_size: int = 1
    lorc_rank: int = 0
    lorc_bits: int | None = None
    min_expert_tokens: int = 16
    gguf_mix: str | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if self.weight is None and self.act is None and self.kv is None:
            raise ConfigError("nothing to quantize: set weight, activation or KV-cache bits below 16")
        if not isinstance(self.min_expert_tokens, int) or self.min_expert_tokens < 1:
            raise ConfigError(f"min_expert_tokens must be an integer >= 1 (an expert without tokens cannot be "
                             f"calibrated), got {self.min_expert_tokens!r}")
        for name in ("nsamples", "seqlen", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.nsamples % self.batch_size:
            raise ConfigError(f"nsamples ({self.nsamples}) must be a multiple of batch_size ({self.batch_size})")
        if self.calib_order not in CALIB_ORDERS:
            raise ConfigError(f"unknown calib_order {self.calib_order!r}; use one of: {', '.join(CALIB_ORDERS)}")
        _check_lorc(self)
        _check_mix(self)
        if self.options is None:
            object.__setattr__(self, "options", method.default(self.act is not None))
        elif method.options is None or not isinstance(self.options, method.options):
            want = "no options" if method.options is None else f"{method.options.__name__} options"
            raise ConfigError(f"method {self.method!r} takes {want}, got {type(self.options).__name__}; drop "
                              "'options' or change the method")

    def learned(self) -> Any:
        """The block-reconstruction recipe (a ReconstructConfig) of a trained method (None for methods that do not
        train)."""
        return get_method(self.method).learned(self.options)

    @property
    def label(self) -> str:
        """Short setting name, e.g. ``W4A16g128``, ``W4A8`` (FP formats add their name)."""
        def part(prefix: str, spec: QuantSpec | None) -> str:
            if spec is None:
                return f"{prefix}16"
            s = f"{prefix}{spec.format.bits}"
            return s + (f"({spec.format.name})" if spec.format.is_float else "")
        g = getattr(self.weight.granularity, "group_size", None) if self.weight else None
        lorc = f"+lorc{self.lorc_rank}" + (f"(int{self.lorc_bits})" if self.lorc_bits else "") if self.lorc_rank else ""
        kv = "" if self.kv is None else part("KV", self.kv)
        return part("W", self.weight) + part("A", self.act) + kv + (f"g{g}" if g else "") + lorc

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "method": self.method,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "act": None if self.act is None else self.act.to_dict(),
            "kv": None if self.kv is None else self.kv.to_dict(),
            "options": None if self.options is None else dataclasses.asdict(self.options),
            "calib": self.calib,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "calib_order": self.calib_order,
            "batch_size": self.batch_size,
            "lorc_rank": self.lorc_rank,
            "lorc_bits": self.lorc_bits,
            "min_expert_tokens": self.min_expert_tokens,
            "gguf_mix": self.gguf_mix,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Strict inverse of :meth:`to_dict` (unknown keys, wrong types and newer versions are errors)."""
        if not isinstance(d, dict):
            raise ConfigError("a recipe must be a JSON object")
        d = dict(d)
        version = d.pop("version", 1 if set(d) & set(_v1_option_types()) else CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(f"recipe version {version!r} is newer than this bitsmith ({CONFIG_VERSION}); upgrade")
        if version < 2:
            d = _from_v1(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        for key in ("weight", "act", "kv"):
            if d.get(key) is not None:
                d[key] = _spec(d[key], key)
        _check_types(d)
        options_type = get_method(d.get("method", DEFAULT_METHOD)).options
        if d.get("options") is not None:
            if options_type is None:
                raise ConfigError(f"method {d['method']!r} takes no options; drop recipe key 'options'")
            d["options"] = _nested(options_type, d["options"], "options")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"recipe file {p} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe file {p} is not valid JSON ({e}); fix the file") from None


def _spec(d: Any, key: str) -> QuantSpec:
    try:
        return spec_from_dict(d)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"recipe key {key!r} is malformed ({e}); see recipes/*.json for the layout") from None


def _v1_option_types() -> dict[str, type]:
    """Version-1 recipe key → options type, from the registered methods (e.g. ``gptq`` → GPTQConfig)."""
    methods = [get_method(n) for n in method_names()]
    return {m.v1_key: m.options for m in methods if m.v1_key is not None}


def _from_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A version-1 recipe (every method's options at the top level) in the version-2 layout: the chosen
    method's options under ``options`` (a learned method's GPTQ-start options moved inside them)."""
    d = dict(d)
    method = get_method(d.get("method", "rtn")) if isinstance(d.get("method", "rtn"), str) else None
    d.setdefault("method", "rtn")  # version 1's library default
    types = _v1_option_types()
    blocks = {k: d.pop(k) for k in types if k in d}
    for key, value in blocks.items():  # still validated, as version 1 did, though only one is kept
        if value is not None:
            _nested(types[key], value, key)
    if method is None or method.v1_key is None:
        return d
    options = blocks.get(method.v1_key)
    if method.v1_key == "reconstruct" and blocks.get("gptq") is not None:
        base = options if options is not None else dataclasses.asdict(method.default(False))
        options = {**base, "gptq": blocks["gptq"]}
    d["options"] = options
    return d


def _nested(cls_: type, value: Any, key: str) -> Any:
    """A nested options object (e.g. GPTQ's) from its JSON object, keys and value types checked (recursively
    for options that hold options, e.g. a learned recipe's ``gptq``)."""
    fields = {f.name: f for f in dataclasses.fields(cls_)}
    if not isinstance(value, dict) or set(value) - set(fields):
        raise ConfigError(f"recipe key {key!r} must be an object with keys from: {', '.join(sorted(fields))}")
    value = dict(value)
    for name, v in value.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            value[name] = _nested(type(default), v, f"{key}.{name}")
            continue
        ok = (isinstance(v, bool) if isinstance(default, bool)
              else isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(default, float)
              else isinstance(v, int) and not isinstance(v, bool) if isinstance(default, int) else True)
        if not ok:
            raise ConfigError(f"recipe key {key}.{name} must be {type(default).__name__}, got {type(v).__name__}")
    return cls_(**value)


def _check_types(d: dict[str, Any]) -> None:
    types = {"method": str, "calib": str, "nsamples": int, "seqlen": int, "seed": int, "batch_size": int,
             "calib_order": str}
    types["lorc_rank"] = int
    types["min_expert_tokens"] = int
    if d.get("gguf_mix") is not None:
        types["gguf_mix"] = str
    for key, typ in types.items():
        if key in d and (not isinstance(d[key], typ) or isinstance(d[key], bool)):
            raise ConfigError(f"recipe key {key!r} must be {typ.__name__}, got {type(d[key]).__name__}")
    bits = d.get("lorc_bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool)):
        raise ConfigError(f"recipe key 'lorc_bits' must be int or null, got {type(bits).__name__}")


def _check_mix(c: QuantConfig) -> None:
    """A GGUF K-quant mix needs the K-quant weight format it is built on (``q4_k_m`` → ``q4_k``)."""
    from .formats import GGUF_MIXES

    if c.gguf_mix is None:
        return
    if c.gguf_mix not in GGUF_MIXES:
        raise ConfigError(f"unknown gguf_mix {c.gguf_mix!r}; use one of {', '.join(GGUF_MIXES)}")
    base = c.gguf_mix[:4]
    if c.weight is None or c.weight.format.name != base:
        raise ConfigError(f"gguf_mix {c.gguf_mix} mixes {base} weights with more bits in some layers; quantize with "
                         f"--wformat {base}")


def _check_lorc(c: QuantConfig) -> None:
    """LoRC settings: a non-negative rank, factor bits 2–8 or None, and quantized weights to compensate."""
    r, bits = c.lorc_rank, c.lorc_bits
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ConfigError(f"lorc_rank must be a non-negative integer (0 = no LoRC), got {r!r}")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8):
        raise ConfigError(f"lorc_bits must be 2–8 (8 = INT8 factors) or unset for fp16 factors, got {bits!r}")
    if bits is not None and r == 0:
        raise ConfigError("LoRC factor bits are set but the LoRC rank is 0; pass --lorc-rank R > 0 or drop --lorc-bits")
    if r and c.weight is None:
        raise ConfigError(f"LoRC (rank {r}) compensates weight quantization error; it needs quantized weights "
                         "(weight bits below 16)")
