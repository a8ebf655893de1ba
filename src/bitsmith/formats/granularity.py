"""Granularity as a value: which elements share one scale (and zero point).

Every granularity reduces over the **last** dimension of a tensor, in blocks:

============  =====================================================  ===========================
granularity   blocks (for a weight ``(out, in)``)                     qparams shape
============  =====================================================  ===========================
PerTensor     the whole tensor                                        ``(1, 1, 1)``
PerChannel    each output row (the whole ``in`` dimension)            ``(out, 1, 1)``
PerGroup(g)   each run of ``g`` inputs of a row; the last may be      ``(out, ceil(in/g), 1)``
              shorter (ragged) when ``in % g != 0``
PerToken      each row of an activation ``(..., hidden)``             ``(prod(...), 1, 1)``
============  =====================================================  ===========================

``to_groups`` reshapes to ``(rows, n_groups, group_len)``; a ragged last group is padded by repeating its own
last element, which changes neither its min, max nor absmax, so statistics are those of the real elements.
``from_groups`` drops the padding and restores the shape. Worked example: a ``(2, 5)`` weight with
``PerGroup(2)`` becomes ``(2, 3, 2)``; row 0 ``[a b c d e]`` is grouped as ``[[a b] [c d] [e e]]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Granularity:
    """Base class; use one of :class:`PerTensor`, :class:`PerChannel`, :class:`PerGroup`, :class:`PerToken`."""

    def group_len(self, n: int) -> int:
        """Length of one block along a last dimension of size ``n``."""
        raise NotImplementedError

    def n_groups(self, n: int) -> int:
        """Number of blocks along a last dimension of size ``n`` (per row)."""
        return math.ceil(n / self.group_len(n))

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., n)`` → ``(rows, n_groups, group_len)`` with ragged padding (see module docstring)."""
        if x.dim() == 0:
            raise ValueError("cannot quantize a 0-d tensor; give it at least one dimension")
        n = x.shape[-1]
        rows = x.reshape(-1, n)
        g = self.group_len(n)
        pad = self.n_groups(n) * g - n
        if pad:
            rows = torch.cat([rows, rows[:, -1:].expand(rows.shape[0], pad)], dim=1)
        return rows.reshape(rows.shape[0], -1, g)

    def from_groups(self, xg: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`to_groups`: ``(rows, n_groups, group_len)`` → ``shape``."""
        n = shape[-1]
        return xg.reshape(xg.shape[0], -1)[:, :n].reshape(shape)

    def expand(self, q: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Broadcast per-block qparams ``(rows, n_groups, 1)`` to a full tensor of ``shape``."""
        n = shape[-1]
        g = self.group_len(n)
        full = q.expand(q.shape[0], q.shape[1], g)
        return self.from_groups(full, shape)

    def to_dict(self) -> dict:
        return {"kind": self.kind}

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    def group_len(self, n: int) -> int:
        return n

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, 1, -1)

    def from_groups(self, xg: torch.Tensor, shape) -> torch.Tensor:
        return xg.reshape(shape)

    def expand(self, q: torch.Tensor, shape) -> torch.Tensor:
        return q.reshape(()).expand(shape)

    @property
    def kind(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per output row of a weight ``(out, in)``."""

    def group_len(self, n: int) -> int:
        return n

    @property
    def kind(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per token (row) of an activation ``(..., hidden)``; same math as :class:`PerChannel`."""

    def group_len(self, n: int) -> int:
        return n

    @property
    def kind(self) -> str:
        return "token"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements of the last dimension of each row."""

    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(
                f"group size must be a positive integer, got {self.group_size!r}; use e.g. 32, 64 or 128, "
                "or per-channel quantization"
            )

    def group_len(self, n: int) -> int:
        return self.group_size

    def to_dict(self) -> dict:
        return {"kind": "group", "group_size": self.group_size}

    @property
    def kind(self) -> str:
        return "group"


def granularity_from_dict(d: dict) -> Granularity:
    """Inverse of ``Granularity.to_dict``."""
    kind = d.get("kind")
    if kind == "group":
        return PerGroup(int(d["group_size"]))
    table = {"tensor": PerTensor, "channel": PerChannel, "token": PerToken}
    if kind not in table:
        raise ConfigError(f"unknown granularity {kind!r}; use one of tensor, channel, token, group")
    return table[kind]()
