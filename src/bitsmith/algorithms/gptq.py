"""GPTQ (Frantar et al., arXiv 2210.17323): second-order weight quantization, one column at a time.

Pure tensor functions: :func:`accumulate_hessian` builds ``H = 2/N · Σ x xᵀ`` from layer inputs, and
:func:`gptq_quantize` quantizes ``W (out, in)`` against it with any :class:`~bitsmith.formats.QuantSpec`
(integer or FP formats; per-tensor, per-channel or grouped with ragged last groups; M1/M2 scale constraints).

Algorithm (paper Alg. 1, lazy batch updates of ``blocksize`` columns): with ``U = chol(H⁻¹)ᵀ`` (upper),
for each column ``j``: ``q_j = Q(w_j)``, ``e_j = (w_j − q_j) / U_jj``, ``W[:, j:] −= e_j · U_j,j:``.

Grouped qparams are computed **where the reference code computes them, but on up-to-date weights**: when the
walk reaches a group's first column, from the group's columns *after* all error updates so far (the reference
reads stale columns of the current lazy block). With act-order (columns processed by decreasing ``H_jj``) or an
M2 constraint (one real scale per row needs every group at once), qparams are fixed up front from the
original weights ("static groups"), so each column keeps the group of its original index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericsError
from ..formats import PerChannel, PerGroup, PerTensor, QuantizedTensor, QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ options: relative dampening ``percdamp`` (of mean diag H), lazy ``blocksize``, ``actorder``,
    and ``static_groups`` (fix group qparams from the original weights). ``hessian_mb``: most MiB of Hessians
    (``in × in`` fp32 each) held at once; a block whose linears need more (a mixture of many experts) collects
    them in several passes over its calibration inputs, solving each pass's layers before the next."""

    percdamp: float = 0.01
    blocksize: int = 128
    actorder: bool = False
    static_groups: bool = False
    hessian_mb: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 < self.percdamp < 10.0:
            raise ConfigError(f"GPTQ dampening must be in (0, 10), got {self.percdamp}; the usual value is 0.01")
        if not isinstance(self.hessian_mb, int) or self.hessian_mb < 1:
            raise ConfigError(f"GPTQ hessian_mb must be a positive integer (MiB), got {self.hessian_mb!r}")
        if self.blocksize < 1:
            raise ConfigError(f"GPTQ block size must be ≥ 1, got {self.blocksize}; the usual value is 128")


def accumulate_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running ``H = 2/N · Σ x xᵀ`` over all tokens. ``x (..., in)``; returns ``(H (in, in) fp32, N)``."""
    x = x.reshape(-1, x.shape[-1]).float()
    m = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
    h.mul_(n / (n + m))
    x = x * (2.0 / (n + m)) ** 0.5
    h.addmm_(x.t(), x)
    return h, n + m


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ grows ×10 until the factorization succeeds."""
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return upper
        log.warning("GPTQ: Hessian not positive definite with dampening %.3g; retrying ×10", float(damp))
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=h.device)
    raise NumericsError("GPTQ: the Hessian stayed singular after dampening ×1e5; check the calibration inputs for NaN")


class _Grid:
    """Column-wise access to qparams: ``scale(j)``/``zero(j)`` return ``(out,)`` tensors for column ``j``."""

    def __init__(self, spec: QuantSpec, w: torch.Tensor, static: bool) -> None:
        self.spec = spec
        self.cols = w.shape[1]
        g = spec.granularity
        self.group = g.group_size if isinstance(g, PerGroup) else self.cols
        # K-quants: a super-block's scales are quantized together, so all qparams come from the start weights
        self.dynamic = isinstance(g, PerGroup) and not static and spec.format.sub_block is None
        self.column_spec = QuantSpec(spec.format, PerChannel(), spec.scale_constraint) if self.dynamic else None
        self.scale = self.zero = None
        self.raw: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if not self.dynamic:  # all qparams now: (rows, G, 1) → (out, G)
            s, z = spec.qparams(w)
            self.raw = (s, z)
            rows = w.shape[0]
            self.scale = s.reshape(s.shape[0], -1).expand(rows, -1) if isinstance(g, PerTensor) else s[..., 0]
            self.zero = None if z is None else (
                z.reshape(z.shape[0], -1).expand(rows, -1) if isinstance(g, PerTensor) else z[..., 0])
            if isinstance(g, PerTensor):
                self.group = self.cols
        else:
            n_groups = g.n_groups(self.cols)
            self.scale = torch.empty(w.shape[0], n_groups, device=w.device, dtype=w.dtype)
            self.zero = torch.empty_like(self.scale) if spec.format.has_zero_point else None

    def needs_refresh(self, j: int) -> bool:
        """True at the first column of a dynamic group."""
        return self.dynamic and j % self.group == 0

    def refresh(self, j: int, upcoming: torch.Tensor) -> None:
        """Qparams of the group starting at column ``j`` from its up-to-date columns ``upcoming (out, ≤g)``."""
        s, z = self.column_spec.qparams(upcoming[:, : self.group])
        self.scale[:, j // self.group] = s[:, 0, 0]
        if self.zero is not None:
            self.zero[:, j // self.group] = z[:, 0, 0]

    def quant(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """Quantize-dequantize column ``w (out,)`` that sits at original column ``j``."""
        k = j // self.group
        s = self.scale[:, k]
        z = None if self.zero is None else self.zero[:, k]
        return self.spec.format.fake_quant(w, s, z)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final qparams in the spec's own block layout."""
        return self.raw if self.raw is not None else (self.scale, self.zero)


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig()
) -> tuple[QuantizedTensor, float]:
    """Quantize ``w (out, in)`` with Hessian ``h (in, in)``; returns the frozen tensor and the summed
    GPTQ objective ``Σ (w − q)² / U_jj²`` (lower is better)."""
    qt, loss, _ = gptq_solve(w, h, spec, cfg)
    return qt, loss


@torch.no_grad()
def gptq_solve(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig()
) -> tuple[QuantizedTensor, float, torch.Tensor]:
    """:func:`gptq_quantize`, plus the error-compensated weights ``(out, in)`` each column had when it was
    rounded: quantizing them on the returned grid gives GPTQ's codes (a start point for learned rounding)."""
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = cfg.static_groups or cfg.actorder or spec.scale_constraint == "m2"
    grid = _Grid(spec, w, static)
    perm = torch.argsort(torch.diag(h), descending=True) if cfg.actorder else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, cfg.percdamp)
    q = torch.zeros_like(w)
    latent = torch.zeros_like(w)
    loss = torch.zeros((), device=w.device)
    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            if grid.needs_refresh(j):  # group columns past this lazy block still miss its pending updates
                tail = w[:, i2 : j + grid.group] - err[:, :i] @ u[i1 : i1 + i, i2 : j + grid.group]
                grid.refresh(j, torch.cat([w1[:, i:], tail], dim=1))
            col = w1[:, i]
            qc = grid.quant(col, int(perm[j]))
            q[:, j] = qc
            latent[:, j] = col
            d = u1[i, i]
            loss += ((col - qc) ** 2).sum() / d**2
            e = (col - qc) / d
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    inv = torch.argsort(perm)
    scale, zero = grid.qparams()
    return spec.quantize(q[:, inv], scale, zero), float(loss), latent[:, inv]
