"""AWQ scale search and SmoothQuant smoothing on a layer with activation outlier channels."""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.algorithms.awq import AWQConfig, awq_block, search_scale
from bitsmith.algorithms.smoothquant import SmoothQuantConfig, smoothquant_block
from bitsmith.formats import IntFormat, PerChannel, PerToken, QuantSpec
from bitsmith.nn import QuantLinear, set_quant_state
from bitsmith.transforms import ChannelStats, Edge, Site


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.weight


def _setup(act: QuantSpec | None = None):
    torch.manual_seed(0)
    norm, lin = _Norm(64), nn.Linear(64, 32, bias=False)
    x = torch.randn(512, 64)
    x[:, :3] *= 40.0  # outlier channels, as in LLM activations
    q = QuantLinear(lin, QuantSpec(IntFormat(3), PerChannel()), act)
    edge = Edge("norm", 64, [Site(norm, "rows_div"), Site(q, "cols_mul")])
    model = nn.Sequential(norm, q)
    return model, q, edge, x, lin(x).detach()


def test_awq_search_beats_plain_rounding_and_folds_exactly():
    model, q, edge, x, ref = _setup()
    set_quant_state(model, weight=False, act=False)
    s, alpha = search_scale(edge, x, AWQConfig())
    assert alpha > 0 and s[:3].mean() > s[3:].mean()  # salient (outlier) channels get larger scales
    set_quant_state(model, weight=True, act=False)
    before = float((model(x) - ref).pow(2).mean().detach())
    awq_block({"q": q}, [edge], {"norm": x}, AWQConfig())
    set_quant_state(model, weight=False, act=False)
    assert torch.allclose(model(x), ref, atol=1e-4)  # folding preserved the function
    set_quant_state(model, weight=True, act=False)
    assert float((model(x) - ref).pow(2).mean().detach()) < 0.8 * before


def test_smoothquant_migrates_outliers_for_activation_quantization():
    model, q, edge, x, ref = _setup(act=QuantSpec(IntFormat(4), PerToken()))
    set_quant_state(model, weight=True, act=True)
    before = float((model(x) - ref).pow(2).mean().detach())
    stats = ChannelStats()
    stats.update(x)
    smoothquant_block({"q": q}, [edge], {"norm": stats}, SmoothQuantConfig(alpha=0.5))
    set_quant_state(model, weight=False, act=False)
    assert torch.allclose(model(x), ref, atol=1e-4)
    set_quant_state(model, weight=True, act=True)
    assert float((model(x) - ref).pow(2).mean().detach()) < 0.5 * before
