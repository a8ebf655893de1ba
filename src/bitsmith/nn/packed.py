"""PackedLinear: the last lifecycle stage — bit-packed codes plus scales/zeros, dequantize-and-matmul forward.

Storage per layer (buffers):

* ``qweight``: integer codes as unsigned values, packed along the input dim with
  :func:`bitsmith.formats.packing.pack_int` (int32 words; symmetric codes are offset by ``2^(N−1)``), or FP4
  codes two per byte with :func:`~bitsmith.formats.packing.pack_fp4`; shape ``(out, words)``.
* ``scale``: ``(out, G)`` in the model dtype (or ``(1, 1)`` per tensor); ``zero``: ``(out, G)`` uint8 codes
  (asymmetric integer formats only).

The reference forward (:meth:`PackedLinear.reference_forward`) unpacks, dequantizes and calls ``F.linear``; it is
bit-exact with the frozen QuantLinear's weight. On an accelerator with Triton installed (``pip install -e
".[gpu]"``), 4-bit INT layers (asymmetric or symmetric; per tensor, per channel, or power-of-two groups ≥ 16,
ragged last group included) run the fused dequantize-matmul of :mod:`bitsmith.nn.kernels.w4_triton` instead
(fp32 accumulation, same result up to rounding); :meth:`PackedLinear.kernel_path` says which path an input takes.

Optional LoRC factors (ZeroQuant-V2, arXiv 2303.08302; :mod:`bitsmith.algorithms.lorc`), attached by
:meth:`PackedLinear.set_lorc`: ``A (out, r)`` and ``B (r, in)``, each stored as a float buffer (``lorc_a``,
``lorc_b``) or, when quantized, as packed codes (``lorc_a_packed``) plus one scale per row (``lorc_a_scale``).
The layer then computes ``x · (Ŵ + A·B)ᵀ + b`` (the reference path folds ``A·B``; a kernel would run it as a
skinny second GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import E2M1, IntFormat, QuantizedTensor, QuantSpec
from ..formats.packing import pack_fp4, pack_int, storage_bits, unpack_fp4, unpack_int
from .kernels import W4_DTYPES, w4_available, w4_group_size


def _offset(spec: QuantSpec) -> int:
    """Added to codes before packing so they are unsigned (symmetric integers are signed)."""
    fmt = spec.format
    return -fmt.qmin if isinstance(fmt, IntFormat) else 0


def pack_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Packed storage of ``qt.codes (out, in)``."""
    codes = qt.codes.to(torch.int32) + _offset(qt.spec)
    if qt.spec.format == E2M1:
        return pack_fp4(codes.to(torch.uint8))
    return pack_int(codes, qt.spec.format.bits)


def unpack_codes(packed: torch.Tensor, spec: QuantSpec, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: codes ``(out, n)`` in the format's own dtype (int8/uint8)."""
    if spec.format == E2M1:
        return unpack_fp4(packed, n)
    codes = unpack_int(packed, spec.format.bits, n)
    off = _offset(spec)
    return (codes.to(torch.int16) - off).to(torch.int8) if off else codes


class PackedLinear(nn.Module):
    """``y = x · dequant(unpack(qweight))ᵀ + b``; x ``(..., in)``, y ``(..., out)``."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = qt.spec
        self.out_features, self.in_features = qt.codes.shape
        self.register_buffer("qweight", pack_codes(qt))
        self.register_buffer("scale", qt.scale.to(dtype))
        real_zero = qt.spec.format.sub_block is not None  # K-quants: z = dmin·m / s is real
        self.register_buffer("zero", None if qt.zero is None else qt.zero.to(dtype if real_zero else torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_frozen(cls, q: nn.Module) -> "PackedLinear":
        """Pack a frozen :class:`~bitsmith.nn.QuantLinear` (with its LoRC factors ``q.lorc``, if any)."""
        if getattr(q, "frozen", None) is None:
            raise ValueError("only a frozen QuantLinear can be packed; call freeze() first")
        packed = cls(q.frozen, q.bias, q.weight.dtype)
        if getattr(q, "lorc", None) is not None:
            packed.set_lorc(q.lorc.a, q.lorc.b)
        return packed

    # ---- LoRC low-rank branch ------------------------------------------------------------------------
    def set_lorc(self, a: torch.Tensor | QuantizedTensor, b: torch.Tensor | QuantizedTensor) -> None:
        """Attach LoRC factors ``A (out, r)``, ``B (r, in)``: float tensors (kept in their dtype) or frozen
        symmetric-integer QuantizedTensors with one scale per row (codes packed like the weight's)."""
        self.lorc_specs: dict[str, QuantSpec] = {}
        for name, f in (("lorc_a", a), ("lorc_b", b)):
            if isinstance(f, QuantizedTensor):
                if f.zero is not None:
                    raise ValueError("LoRC factors must be quantized symmetrically (no zero point)")
                self.register_buffer(f"{name}_packed", pack_codes(f))
                self.register_buffer(f"{name}_scale", f.scale.to(self.scale.dtype))
                self.lorc_specs[name] = f.spec
            else:
                self.register_buffer(name, f.detach().clone())
        self.lorc_rank = int((a.codes if isinstance(a, QuantizedTensor) else a).shape[1])

    def lorc_factors(self) -> tuple[torch.Tensor | QuantizedTensor, torch.Tensor | QuantizedTensor] | None:
        """The stored LoRC factors ``(A, B)`` (QuantizedTensors with unpacked codes when quantized), or None."""
        if not hasattr(self, "lorc_specs"):
            return None
        out = []
        for name, n in (("lorc_a", self.lorc_rank), ("lorc_b", self.in_features)):
            spec = self.lorc_specs.get(name)
            if spec is None:
                out.append(getattr(self, name))
            else:
                codes = unpack_codes(getattr(self, f"{name}_packed"), spec, n)
                out.append(QuantizedTensor(codes, getattr(self, f"{name}_scale"), None, spec))
        return out[0], out[1]

    def lorc_storage_bits(self, scale_bits: int = 16) -> int:
        """Logical storage of the LoRC factors: ``r·(in + out)·bits`` (16 for float factors) + row scales."""
        factors = self.lorc_factors()
        if factors is None:
            return 0
        total = 0
        for f in factors:
            if isinstance(f, QuantizedTensor):
                total += storage_bits(f.codes.numel(), f.spec.format.bits, f.scale.numel(), scale_bits)
            else:
                total += storage_bits(f.numel(), 16, 0)
        return total

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward uses, ``Ŵ + A·B`` (out, in) with LoRC (folded in fp32), else ``Ŵ``."""
        factors = self.lorc_factors()
        if factors is None:
            return self.dequantized_weight()
        a, b = (f.dequantize(torch.float32) if isinstance(f, QuantizedTensor) else f.float() for f in factors)
        return (self.unpack().dequantize(torch.float32) + a @ b).to(self.scale.dtype)

    def unpack(self) -> QuantizedTensor:
        """The frozen quantization this layer stores (codes unpacked, qparams as stored)."""
        codes = unpack_codes(self.qweight, self.spec, self.in_features)
        zero = None if self.zero is None else self.zero.to(self.scale.dtype)
        return QuantizedTensor(codes, self.scale, zero, self.spec)

    def dequantized_weight(self) -> torch.Tensor:
        return self.unpack().dequantize(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_path(x) == "w4-triton":
            return self._w4_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unpack, dequantize (LoRC folded in), ``F.linear``; x ``(..., in)`` → ``(..., out)``."""
        w = self.effective_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def kernel_path(self, x: torch.Tensor) -> str:
        """``"w4-triton"`` when ``forward(x)`` runs the fused W4 kernel (supported layout, fp16/bf16/fp32 input
        on a device Triton runs on, no gradient needed), else ``"reference"``."""
        group = w4_group_size(self.spec, self.out_features, self.in_features, self.scale, self.zero)
        if group is None or x.dtype not in W4_DTYPES or (x.requires_grad and torch.is_grad_enabled()):
            return "reference"
        return "w4-triton" if w4_available(x.device) else "reference"

    def _w4_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused kernel for ``x · Ŵᵀ``; LoRC as a skinny second product ``(x · Bᵀ) · Aᵀ``, then the bias."""
        from .kernels.w4_triton import w4_linear

        group = w4_group_size(self.spec, self.out_features, self.in_features, self.scale, self.zero)
        y = w4_linear(x.reshape(-1, self.in_features), self.qweight, self.scale, self.zero, group,
                      _offset(self.spec)).reshape(*x.shape[:-1], self.out_features)
        factors = self.lorc_factors()
        if factors is not None:
            a, b = (f.dequantize(x.dtype) if isinstance(f, QuantizedTensor) else f.to(x.dtype) for f in factors)
            y = y + F.linear(F.linear(x, b), a)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def storage_bits(self, scale_bits: int = 16) -> int:
        """Logical storage of codes + scales + zeros (zeros at the code width) + LoRC factors, without bias."""
        n = self.out_features * self.in_features
        bits = self.spec.format.bits
        fmt = self.spec.format
        if fmt.sub_block is not None:  # K-quant: 6-bit scale (+ min) per sub-block, fp16 d (+ dmin)
            per_sub, per_super = (12, 32) if fmt.has_min else (8, 16)
            return n * bits + self.scale.numel() * per_sub + (n // 256) * per_super + self.lorc_storage_bits(scale_bits)
        n_zero = 0 if self.zero is None else self.zero.numel()
        dense = storage_bits(n, bits, self.scale.numel(), scale_bits, n_zero, bits)
        return dense + self.lorc_storage_bits(scale_bits)

    def buffer_nbytes(self) -> int:
        """Bytes actually held in memory by the quantized buffers (codes, scales, zeros)."""
        bufs = [self.qweight, self.scale] + ([self.zero] if self.zero is not None else [])
        bufs += [b for n, b in self.named_buffers() if n.startswith("lorc_")]
        return sum(b.numel() * b.element_size() for b in bufs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.format.name}, {self.spec.granularity}"
