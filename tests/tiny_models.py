"""Tiny random HF models of every registered family, built from a config (no downloads), seeded.

Each config exercises what makes its family different: GQA (Llama, Mistral, Qwen2), a sliding-window mask
(Mistral: window 4 < T; Qwen2: only layers >= max_window_layers slide, so blocks get different masks), q/k/v
biases (Qwen2), OPT's project_in/project_out (word_embed_proj_dim != hidden), GPT-NeoX's partial rotary and
parallel residual; Qwen3's per-head q/k norms (head_dim 16 != hidden / heads); Gemma 2's (1 + w) norms, four norms
per block, attention and final logit soft-capping (caps small enough to bend the logits) and a sliding window;
Gemma 3's q/k norms and alternating sliding/full layers; Phi-3's fused qkv_proj and gate_up_proj with partial
rotary; Mixtral and Qwen3-MoE with 4 experts, 2 per token, stored as 3-D parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 128
HIDDEN = 32
LAYERS = 2
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3moe", "opt", "neox")
MOE_FAMILIES = ("mixtral", "qwen3moe")
ARCH_OF_FAMILY = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
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
    if family == "qwen3":
        return Qwen3Config(**{**_LLAMA_LIKE, "head_dim": 16, **overrides}, architectures=arch)
    if family == "gemma2":
        kw = {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 2.0,
              "attn_logit_softcapping": 1.0, "query_pre_attn_scalar": 8, **overrides}
        return Gemma2Config(**kw, architectures=arch)
    if family == "gemma3":
        kw = {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "final_logit_softcapping": 2.0,
              "query_pre_attn_scalar": 8, "layer_types": ["sliding_attention", "full_attention"], **overrides}
        return Gemma3TextConfig(**kw, architectures=arch)
    if family == "phi3":
        kw = {**_LLAMA_LIKE, "pad_token_id": 0, "partial_rotary_factor": 0.5, **overrides}
        return Phi3Config(**kw, architectures=arch)
    if family == "mixtral":
        kw = {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, **overrides}
        return MixtralConfig(**kw, architectures=arch)
    if family == "qwen3moe":
        kw = {**_LLAMA_LIKE, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "norm_topk_prob": True, **overrides}
        return Qwen3MoeConfig(**kw, architectures=arch)
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
        for name, param in model.named_parameters():  # 3-D expert weights start at zero on some versions
            if ".experts." in name and param.dim() == 3:
                param.copy_(0.2 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + 2)))
    model.config.use_cache = False
    return model


def random_ids(n: int, t: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """LongTensor (n, t) of token ids."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def engine_model(folder, seed: int = 0, hidden: int = 128, ffn: int = 384):
    """A Llama model shaped for real inference engines, saved to ``folder`` (fp32): head_dim 64 (vLLM's CPU
    attention refuses 16), GQA 2:1, hidden 128, FFN 384 (a multiple of 128, so W4AFP8's groups of 128 fit;
    ``hidden=256, ffn=768``: every row a multiple of 256, for K-quants), vocab 512 (the stories260K samples' token
    ids). Weights N(0, 0.08), seeded. Returns the folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
                         max_position_embeddings=512,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder
