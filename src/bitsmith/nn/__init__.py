"""Quantized modules: quantizers (with LWC), QuantLinear, PackedLinear, and the lifecycle that swaps them."""

from .lifecycle import fold_to_linear, freeze_all, pack_all, quant_linears, set_quant_state, to_fake
from .packed import PackedLinear
from .linear import QuantLinear
from .quantizer import LWC_INIT, ActQuantizer, WeightQuantizer

__all__ = ["QuantLinear", "WeightQuantizer", "ActQuantizer", "LWC_INIT", "to_fake", "set_quant_state",
           "freeze_all", "fold_to_linear", "quant_linears", "pack_all", "PackedLinear"]
