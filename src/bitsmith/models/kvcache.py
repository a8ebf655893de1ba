"""KV-cache quantization through Hugging Face's attention interface (no attention code is re-implemented).

Transformers ≥ 5 looks the attention function up by ``config._attn_implementation`` and calls it with the
query/key/value states **after RoPE** (key/value ``(b, kv_heads, T, head_dim)``, before GQA repetition) — the
tensors a real KV cache stores. bitsmith registers wrappers under namespaced keys ``bitsmith_kv_<impl>`` (with the
matching mask function) that fake-quantize key and value per token and per head (OmniQuant A8: reduction over
``head_dim``) with the attention module's :class:`~bitsmith.nn.ActQuantizer` ``kv_quantizer`` and then call the
original implementation (``sdpa``, or the model file's own ``eager_attention_forward``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..formats import QuantSpec
from ..nn import ActQuantizer
from .registry import Architecture, get_blocks

PREFIX = "bitsmith_kv_"
_BASES = ("sdpa", "eager")


def _base_function(module: nn.Module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str):
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        kvq = getattr(module, "kv_quantizer", None)
        if kvq is not None:
            key, value = kvq(key), kvq(value)
        return _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)
    attention.__name__ = f"{PREFIX}{base}"
    return attention


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in _BASES:
        if f"{PREFIX}{base}" not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(f"{PREFIX}{base}", _make_wrapper(base))
            ALL_MASK_ATTENTION_FUNCTIONS.register(f"{PREFIX}{base}", ALL_MASK_ATTENTION_FUNCTIONS[base])


def attention_path(arch: Architecture) -> str:
    """Block-relative path of the attention module (the parent of the q/k/v projection)."""
    return arch.attn_linears[0].rpartition(".")[0]


def enable_kv_quant(model: nn.Module, arch: Architecture, spec: QuantSpec) -> int:
    """Quantize K and V of every block with ``spec`` (per token, per head). Returns the number of blocks."""
    impl = model.config._attn_implementation or "eager"
    base = impl.removeprefix(PREFIX)
    if base not in _BASES:
        raise ModelError(f"KV-cache quantization supports the {' and '.join(_BASES)} attention implementations, "
                         f"not {impl}; load the model with attn_implementation='sdpa'")
    _register()
    model.config._attn_implementation = f"{PREFIX}{base}"
    blocks = get_blocks(model, arch)
    for block in blocks:
        block.get_submodule(attention_path(arch)).kv_quantizer = ActQuantizer(spec)
    return len(blocks)


def disable_kv_quant(model: nn.Module, arch: Architecture) -> None:
    """Remove the KV quantizers and restore the original attention implementation (e.g. before saving)."""
    impl = model.config._attn_implementation or ""
    if impl.startswith(PREFIX):
        model.config._attn_implementation = impl.removeprefix(PREFIX)
    for block in get_blocks(model, arch):
        attn = block.get_submodule(attention_path(arch))
        if hasattr(attn, "kv_quantizer"):
            del attn.kv_quantizer
