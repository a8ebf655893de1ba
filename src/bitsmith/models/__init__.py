"""bitsmith.models: the only place that knows Hugging Face module names.

- :mod:`.registry`: architectures as data rows (:class:`Architecture`), :func:`get_architecture`,
  :func:`geometry`, :func:`find_linears`.
- :mod:`.loading`: :func:`load_model` from a local folder, :func:`model_context_length`.
- :mod:`.walker`: run any registered model block by block (:func:`capture_block_inputs`, :func:`block_forward`,
  :func:`run_blocks`, :func:`final_logits`, :func:`blockwise_logits`).
"""

from __future__ import annotations

from .errors import ModelError
from .loading import load_model, model_context_length
from .registry import (
    ARCHITECTURES,
    Architecture,
    FusedQKV,
    Geometry,
    MoE,
    expand,
    find_linears,
    geometry,
    get_architecture,
    get_blocks,
    resolve,
    rope_pairs,
    supported_architectures,
)
from .moe import fused_experts, split_experts
from .walker import (
    BlockInputs,
    block_forward,
    block_linears,
    blockwise_logits,
    capture_block_inputs,
    final_hidden,
    final_logits,
    head_logits,
    iter_blocks,
    norm_parameter_names,
    norm_parameters,
    on_device,
    run_blocks,
)

__all__ = [
    "ARCHITECTURES", "Architecture", "BlockInputs", "FusedQKV", "Geometry", "MoE", "ModelError", "block_forward",
    "block_linears", "blockwise_logits", "capture_block_inputs", "expand", "final_hidden", "final_logits",
    "find_linears",
    "fused_experts", "geometry", "get_architecture", "get_blocks", "head_logits", "iter_blocks", "load_model",
    "model_context_length", "norm_parameter_names", "norm_parameters", "on_device", "resolve", "rope_pairs", "run_blocks", "split_experts",
    "supported_architectures",
]
