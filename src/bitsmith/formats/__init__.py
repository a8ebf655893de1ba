"""Number formats: pure tensor math (no nn.Module, no model knowledge, no imports from the rest of bitsmith).

Public API: :class:`IntFormat`, :class:`FPFormat` (+ presets ``E4M3``, ``E5M2``, ``E3M2``, ``E2M3``, ``E2M1``),
granularities (:class:`PerTensor`, :class:`PerChannel`, :class:`PerGroup`, :class:`PerToken`),
:class:`QuantSpec` and :class:`QuantizedTensor`, :func:`make_format`, :func:`format_from_dict`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import NumberFormat
from .floating import E2M1, E2M3, E3M2, E4M3, E5M2, FPFormat
from .granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    granularity_from_dict,
)
from .integer import IntFormat
from .kquant import GGUF_MIXES, K_FORMATS, KQuantFormat, fallback_spec, mix_spec
from .spec import (
    MAX_POW2_SHIFT,
    SCALE_CONSTRAINTS,
    QuantizedTensor,
    QuantSpec,
    activation_spec,
    constrain_scale,
)
from .ste import round_ste

FP_PRESETS: dict[str, FPFormat] = {
    "e4m3": E4M3, "fp8": E4M3, "fp8_e4m3": E4M3,
    "e5m2": E5M2, "fp8_e5m2": E5M2,
    "e3m2": E3M2, "fp6": E3M2, "fp6_e3m2": E3M2,
    "e2m3": E2M3, "fp6_e2m3": E2M3,
    "e2m1": E2M1, "fp4": E2M1, "fp4_e2m1": E2M1,
}
FORMAT_NAMES = ("int", *FP_PRESETS, *K_FORMATS)


def make_format(name: str, bits: int | None = None, symmetric: bool = False) -> NumberFormat:
    """Format by name: ``int`` (needs ``bits``, 2–8) or an FP preset (``fp8``/``e4m3``, ``e5m2``, ``fp6``/
    ``e3m2``, ``e2m3``, ``fp4``/``e2m1``; ``bits``, if given, must match the preset's width)."""
    key = name.lower()
    if key == "int":
        if bits is None:
            raise ConfigError("the int format needs a bit width (2–8); pass e.g. --wbits 4")
        return IntFormat(bits, symmetric)
    if key in K_FORMATS:
        fmt = KQuantFormat(key)
        if bits is not None and bits != fmt.bits:
            raise ConfigError(f"format {name} has {fmt.bits}-bit codes, not {bits}; drop the bit width")
        return fmt
    if key not in FP_PRESETS:
        raise ConfigError(f"unknown number format {name!r}; use one of: {', '.join(FORMAT_NAMES)}")
    fmt = FP_PRESETS[key]
    if bits is not None and bits != fmt.bits:
        raise ConfigError(f"format {name} has {fmt.bits} bits, not {bits}; drop the bit width or pick another format")
    return fmt


def format_from_dict(d: dict) -> NumberFormat:
    """Inverse of ``NumberFormat.to_dict``."""
    if d.get("type") == "int":
        return IntFormat(int(d["bits"]), bool(d.get("symmetric", False)))
    if d.get("type") == "kquant":
        return KQuantFormat(str(d["kind"]))
    if d.get("type") == "fp":
        return FPFormat(int(d["ebits"]), int(d["mbits"]), str(d.get("convention", "none")))
    raise ConfigError(f"unknown format description {d!r}; expected type 'int' or 'fp'")


def spec_from_dict(d: dict) -> QuantSpec:
    """Inverse of ``QuantSpec.to_dict``."""
    return QuantSpec(format_from_dict(d["format"]), granularity_from_dict(d["granularity"]),
                     d.get("scale_constraint", "none"))


__all__ = [
    "NumberFormat", "IntFormat", "FPFormat", "E4M3", "E5M2", "E3M2", "E2M3", "E2M1", "FP_PRESETS", "FORMAT_NAMES",
    "Granularity", "PerTensor", "PerChannel", "PerGroup", "PerToken", "granularity_from_dict",
    "QuantSpec", "QuantizedTensor", "activation_spec", "constrain_scale", "SCALE_CONSTRAINTS", "MAX_POW2_SHIFT",
    "make_format", "format_from_dict", "spec_from_dict", "round_ste", "KQuantFormat", "K_FORMATS", "fallback_spec",
    "GGUF_MIXES", "mix_spec",
]
