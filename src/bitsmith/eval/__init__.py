"""bitsmith.eval: evaluation of (quantized) models.

- :mod:`.perplexity`: :func:`perplexity`, :func:`nll_per_window` (GPTQ/OmniQuant protocol) and
  :func:`model_forward` (wraps a Hugging Face causal LM).
"""

from __future__ import annotations

from .perplexity import model_forward, nll_per_window, perplexity

__all__ = ["model_forward", "nll_per_window", "perplexity"]
