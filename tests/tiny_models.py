"""Tiny random HF models of every registered family, built from a config (no downloads), seeded.

Each config exercises what makes its family different: GQA (Llama, Mistral, Qwen2), a sliding-window mask
(Mistral: window 4 < T; Qwen2: only layers >= max_window_layers slide, so blocks get different masks), q/k/v
biases (Qwen2), OPT's project_in/project_out (word_embed_proj_dim != hidden), GPT-NeoX's partial rotary and
parallel residual.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 128
HIDDEN = 32
LAYERS = 2
FAMILIES = ("llama", "mistral", "qwen2", "opt", "neox")
ARCH_OF_FAMILY = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM",
    "neox": "GPTNeoXForCausalLM",
}
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
               max_position_embeddings=64)
_LLAMA_LIKE = dict(_COMMON, intermediate_size=64, num_key_value_heads=2, initializer_range=0.2)


def tiny_config(family: str, **overrides: object) -> PretrainedConfig:
    """Config of a 2-layer, hidden-32, vocab-128 model of ``family`` (``architectures`` set as in a checkpoint)."""
    arch = [ARCH_OF_FAMILY[family]]
    if family == "llama":
        return LlamaConfig(**{**_LLAMA_LIKE, **overrides}, architectures=arch)
    if family == "mistral":
        return MistralConfig(**{**_LLAMA_LIKE, "sliding_window": 4, **overrides}, architectures=arch)
    if family == "qwen2":
        kw = {**_LLAMA_LIKE, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, **overrides}
        return Qwen2Config(**kw, architectures=arch)
    if family == "opt":
        kw = {**_COMMON, "ffn_dim": 64, "word_embed_proj_dim": 16, "init_std": 0.2, **overrides}
        return OPTConfig(**kw, architectures=arch)
    if family == "neox":
        kw = {**_COMMON, "intermediate_size": 64, "rotary_pct": 0.5, "use_parallel_residual": True,
              "initializer_range": 0.2, **overrides}
        return GPTNeoXConfig(**kw, architectures=arch)
    raise KeyError(family)


def _perturb_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Norms start at weight 1 / bias 0; randomise them so a wrong norm→linear mapping cannot pass by accident."""
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                param.data += 0.3 * torch.randn(param.shape, generator=generator)


def tiny_model(family: str, seed: int = 0, **overrides: object) -> nn.Module:
    """Seeded random fp32 model of ``family`` in eval mode with ``use_cache`` off."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    model.config.use_cache = False
    return model


def random_ids(n: int, t: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """LongTensor (n, t) of token ids."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
