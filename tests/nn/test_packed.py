"""PackedLinear: unpack is bit-exact, forward equals the frozen layer, memory matches the accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsmith.formats import E2M1, E3M2, E4M3, IntFormat, PerChannel, PerGroup, PerTensor, QuantSpec
from bitsmith.nn import PackedLinear, QuantLinear, pack_all, quant_linears, to_fake

SPECS = [
    QuantSpec(IntFormat(2), PerGroup(32)),
    QuantSpec(IntFormat(3), PerGroup(32)),
    QuantSpec(IntFormat(4), PerChannel()),
    QuantSpec(IntFormat(4, True), PerGroup(64)),
    QuantSpec(IntFormat(8), PerTensor()),
    QuantSpec(E2M1, PerGroup(32), "m2"),
    QuantSpec(E3M2, PerGroup(32)),
    QuantSpec(E4M3, PerChannel()),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_pack_unpack_exact_and_same_logits(spec):
    torch.manual_seed(0)
    lin = nn.Linear(172, 48)  # ragged: 172 = 5·32 + 12
    q = QuantLinear(lin, spec)
    qt = q.freeze()
    packed = PackedLinear.from_frozen(q)
    back = packed.unpack()
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(packed.dequantized_weight(), qt.dequantize())
    x = torch.randn(3, 172)
    assert torch.equal(packed(x), q(x))


def test_memory_matches_bits_per_weight():
    lin = nn.Linear(1024, 256, bias=False)
    q = QuantLinear(lin, QuantSpec(IntFormat(4), PerGroup(128)))
    q.freeze()
    packed = PackedLinear.from_frozen(q)
    n = 1024 * 256
    # 4-bit codes (int32 words) + fp32 scales + uint8 zeros, 8 groups per row
    assert packed.qweight.numel() * 4 == n * 4 // 8
    assert packed.buffer_nbytes() == n // 2 + 256 * 8 * 4 + 256 * 8
    assert packed.storage_bits() / n == pytest.approx(4 + 16 / 128 + 4 / 128)
    assert packed.buffer_nbytes() < 0.2 * lin.weight.numel() * 4  # vs the fp32 weight


def test_pack_all_replaces_frozen_layers_only():
    block = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    qs = to_fake(block, ["0", "1"], lambda n, l: (QuantSpec(IntFormat(4)), None))
    qs["0"].freeze()
    x = torch.randn(2, 64)
    ref = block(x)
    assert pack_all(block) == 1
    assert isinstance(block[0], PackedLinear) and isinstance(block[1], QuantLinear)
    assert torch.allclose(block(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="freeze"):
        PackedLinear.from_frozen(dict(quant_linears(block))["1"])
