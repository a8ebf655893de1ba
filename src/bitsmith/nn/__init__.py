"""Quantized modules: quantizers (with LWC), QuantLinear, and the lifecycle that swaps them in and out."""

from .lifecycle import fold_to_linear, freeze_all, quant_linears, set_quant_state, to_fake
from .linear import QuantLinear
from .quantizer import LWC_INIT, ActQuantizer, WeightQuantizer

__all__ = ["QuantLinear", "WeightQuantizer", "ActQuantizer", "LWC_INIT", "to_fake", "set_quant_state",
           "freeze_all", "fold_to_linear", "quant_linears"]
