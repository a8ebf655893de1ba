"""Architectures as data: where a Hugging Face causal LM keeps its blocks, and how each block is wired.

One frozen :class:`Architecture` row per HF ``architectures[0]`` name. Module paths are dotted attribute paths:
model-level paths (``layers``, ``embeddings``, ``rotary``, ``final_norm``, ``final_extra``, ``lm_head``) start at the
``*ForCausalLM`` root; block-level paths (``attn_linears``, ``mlp_linears``, ``norm_to_linears``, pairs) start at one
decoder block. Adding an architecture means adding a row here; nothing else in bitsmith knows HF module names.

Rows were written against transformers 5.23–5.25's modeling files (``llama``, ``mistral``, ``qwen2``, ``qwen3``,
``gemma2``, ``gemma3``, ``phi3``, ``mixtral``, ``qwen3_moe``, ``opt``, ``gpt_neox``).

Extensions of the row model for today's families (each one field, general, used by every algorithm alike):

- ``norm_offset`` (Gemma 2/3): the norm computes ``x̂ · (offset + w)``; an equivalence scale acts on ``offset + w``,
  so folds stay exact under the ``(1 + w)`` convention.
- ``qk_norm`` (Qwen3, Gemma 3): per-head RMSNorms between the q/k projections and RoPE undo any scale on q/k rows,
  so the Q/K edge acts on those norms' weights instead (one scale per head dim, shared by all heads, equal within
  each rotary pair): still an exact equivalence, and it still rescales what a KV-cache quantizer sees.
- ``gate_up`` (Phi-3): one linear whose output rows are ``[gate | up]`` (``chunk(2)``); the up→down edge scales
  only its up half.
- ``other_norms`` (Gemma's post-attention/post-feedforward norms, q/k norms): block norms that feed no linear,
  tuned end to end with the others.
- ``logit_softcap`` (Gemma 2/3): config attribute of the final logit soft-cap ``c·tanh(z/c)``, applied wherever
  bitsmith computes logits from hidden states itself.
- ``moe`` (Mixtral, Qwen3-MoE): where a block keeps its experts and router. Transformers 5 stores an experts module's
  projections as 3-D parameters ``(experts, out, in)``; :mod:`bitsmith.models.moe` replaces that module by one
  ``nn.Linear`` per expert and projection (same forward, same routing), so linear names may hold ``*`` for the
  expert index (``mlp.experts.*.gate_proj``), expanded per block by :func:`expand`. ``MoE.checkpoint`` says how the
  checkpoint on disk names them, for the exports.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ModelError

NORM_KINDS = ("rms", "layer")
FUSED_LAYOUTS = ("per_head", "concat")
QKV_PARTS = ("q", "k", "v")
EXPERT = "*"  # in a block-relative name: every expert index


@dataclass(frozen=True)
class Geometry:
    """Attention geometry read from a config (see :func:`geometry`).

    ``rotary_dim``: how many leading dims of each head RoPE rotates (0 without RoPE; < ``head_dim`` for partial
    rotary, e.g. GPT-NeoX). All rows use HF's rotate-half convention: dim ``i`` pairs with ``i + rotary_dim // 2``
    (see :func:`rope_pairs`), so an equivalence scale on q/k must be equal within each pair.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool
    rotary_dim: int

    @property
    def groups(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.heads // self.kv_heads

    @property
    def q_dim(self) -> int:
        """Output features of the q projection: heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Output features of the k (and v) projection: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim


def rope_pairs(geom: Geometry) -> torch.Tensor:
    """Dims of one head that RoPE rotates together: LongTensor (rotary_dim // 2, 2), row ``(i, i + rotary_dim//2)``.

    Empty (0, 2) without RoPE.
    """
    half = geom.rotary_dim // 2
    first = torch.arange(half)
    return torch.stack([first, first + half], dim=1)


@dataclass(frozen=True)
class FusedQKV:
    """How the output rows of one fused q/k/v linear split into q, k and v.

    ``layout``:
      - ``"per_head"``: rows grouped by head, ``[h0: q(d) k(d) v(d) | h1: q(d) k(d) v(d) | ...]`` with d = head_dim.
        GPT-NeoX: ``qkv.view(..., heads, 3 * head_size).chunk(3, dim=-1)``. Needs heads == kv_heads.
      - ``"concat"``: ``[q (heads*d) | k (kv_heads*d) | v (kv_heads*d)]``.
    """

    linear: str
    layout: str

    def __post_init__(self) -> None:
        if self.layout not in FUSED_LAYOUTS:
            raise ValueError(f"FusedQKV.layout must be one of {FUSED_LAYOUTS}, got {self.layout!r}")

    def rows(self, part: str, geom: Geometry) -> torch.Tensor:
        """Row indices of ``part`` ("q", "k" or "v") in the fused weight: LongTensor (heads_of_part * head_dim,).

        Indices are in the order the attention consumes them (head 0 first, then dims within a head), so
        ``weight[rows("v")]`` is exactly the v projection of a separate-q/k/v model.
        """
        if part not in QKV_PARTS:
            raise ValueError(f"part must be one of {QKV_PARTS}, got {part!r}")
        d, which = geom.head_dim, QKV_PARTS.index(part)
        if self.layout == "per_head":
            if geom.kv_heads != geom.heads:
                raise ModelError(f"per-head fused qkv needs heads == kv_heads, got {geom.heads} and {geom.kv_heads}")
            starts = torch.arange(geom.heads) * 3 * d + which * d  # (heads,)
            return (starts[:, None] + torch.arange(d)[None, :]).reshape(-1)
        sizes = (geom.q_dim, geom.kv_dim, geom.kv_dim)
        start = sum(sizes[:which])
        return torch.arange(start, start + sizes[which])


@dataclass(frozen=True)
class MoE:
    """A sparse mixture-of-experts MLP as data.

    ``experts``: block path of the experts module (3-D parameters ``gate_up_proj (E, 2I, H)``, ``down_proj
    (E, H, I)`` in transformers 5, or already one linear per expert). ``router``: block path of the router
    (a module with ``weight (E, H)``), kept in full precision.
    ``checkpoint``: regex renames ``(pattern, replacement)`` from bitsmith's qualified names
    (``model.layers.0.mlp.experts.3.gate_proj``) to the names the checkpoint on disk uses (Mixtral's
    ``model.layers.0.block_sparse_moe.experts.3.w1``), applied by the exports in order.
    """

    experts: str
    router: str
    checkpoint: tuple[tuple[str, str], ...] = ()

    def saved_name(self, name: str) -> str:
        """The checkpoint's name for bitsmith's qualified module/tensor name ``name``."""
        for pattern, replacement in self.checkpoint:
            name = re.sub(pattern, replacement, name)
        return name


@dataclass(frozen=True)
class Architecture:
    """One HF causal-LM family as data.

    Model-level paths (from the ``*ForCausalLM`` root):
      ``layers``: the ModuleList of decoder blocks. ``embeddings``: modules run before block 0 (a path that resolves
      to ``None`` on a given config, e.g. OPT's ``project_in``, is skipped). ``rotary``: model-level rotary
      embedding module, or None. ``final_norm``: norm after the last block (may resolve to None, e.g. OPT-350m).
      ``final_extra``: modules between the final norm and the head (OPT's ``project_out``; None-valued skipped).
      ``lm_head``: the output projection.
    Block-level paths (from one decoder block):
      ``attn_linears``/``mlp_linears``: linears in forward order. ``norm_to_linears``: each norm and the linears that
      read its output (the edges norm scaling/shifting can be folded across). ``q_to_k``, ``v_to_o``: attention
      pairs (with ``fused_qkv`` the q/k/v names denote row slices of one linear). ``up_to_down``: the MLP pair,
      with ``up_down_equivalent`` saying whether a positive per-channel scale can cross what sits between them
      (SiLU-gated: up_proj is multiplied by act(gate), so yes; ReLU: positive homogeneous, yes; GELU: no).
    Config-dependent facts are a bool or the name of the config flag that decides them (see :meth:`flag`):
      ``pre_norm`` (norms read the block input, so ``norm_to_linears`` holds; OPT-350m is post-norm),
      ``parallel_residual`` (attention and MLP both read the block input: GPT-NeoX ``use_parallel_residual``).
    ``norm_offset``, ``qk_norm``, ``gate_up``, ``other_norms``, ``logit_softcap``, ``moe``: see the module docstring.
    """

    name: str
    layers: str
    embeddings: tuple[str, ...]
    rotary: str | None
    final_norm: str
    lm_head: str
    attn_linears: tuple[str, ...]
    mlp_linears: tuple[str, ...]
    norm_to_linears: tuple[tuple[str, tuple[str, ...]], ...]
    q_to_k: tuple[str, str] | None
    v_to_o: tuple[str, str]
    up_to_down: tuple[str, str] | None
    up_down_equivalent: bool
    norm_kind: str
    fused_qkv: FusedQKV | None = None
    final_extra: tuple[str, ...] = ()
    pre_norm: bool | str = True
    parallel_residual: bool | str = False
    norm_offset: float = 0.0
    qk_norm: tuple[str, str] | None = None
    gate_up: str | None = None
    other_norms: tuple[str, ...] = ()
    logit_softcap: str | None = None
    moe: MoE | None = None

    def __post_init__(self) -> None:
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"{self.name}: norm_kind must be one of {NORM_KINDS}, got {self.norm_kind!r}")
        linears = set(self.linear_names) | ({self.moe.router} if self.moe is not None else set())
        edges = [lin for _, targets in self.norm_to_linears for lin in targets]
        for pair in (self.q_to_k, self.v_to_o, self.up_to_down):
            edges.extend(pair or ())
        if self.fused_qkv is not None:
            edges.append(self.fused_qkv.linear)
        if self.gate_up is not None:
            edges.append(self.gate_up)
        missing = [name for name in edges if name not in linears]
        if missing:
            raise ValueError(f"{self.name}: {missing} are not listed in attn_linears/mlp_linears")

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Block-relative names of the row's linears, in forward order (attention, then MLP)."""
        return self.attn_linears + self.mlp_linears

    def softcap(self, config: Any) -> float | None:
        """The final logit soft-cap of ``config`` (None: no cap)."""
        value = getattr(config, self.logit_softcap, None) if self.logit_softcap else None
        return float(value) if value else None

    def flag(self, field_name: str, config: Any) -> bool:
        """Value of a config-dependent flag (``"pre_norm"`` or ``"parallel_residual"``) for this ``config``."""
        value = getattr(self, field_name)
        if isinstance(value, str):
            return bool(getattr(config, value))
        return bool(value)


_LLAMA = Architecture(
    name="LlamaForCausalLM",
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    rotary="model.rotary_emb",
    final_norm="model.norm",
    lm_head="lm_head",
    attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp_linears=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    q_to_k=("self_attn.q_proj", "self_attn.k_proj"),
    v_to_o=("self_attn.v_proj", "self_attn.o_proj"),
    up_to_down=("mlp.up_proj", "mlp.down_proj"),
    up_down_equivalent=True,  # down(act(gate(x)) * up(x)): a scale on up's rows crosses the product exactly
    norm_kind="rms",
)

_OPT = Architecture(
    name="OPTForCausalLM",
    layers="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    rotary=None,
    final_norm="model.decoder.final_layer_norm",
    final_extra=("model.decoder.project_out",),
    lm_head="lm_head",
    attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    mlp_linears=("fc1", "fc2"),
    norm_to_linears=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
    q_to_k=("self_attn.q_proj", "self_attn.k_proj"),
    v_to_o=("self_attn.v_proj", "self_attn.out_proj"),
    up_to_down=("fc1", "fc2"),
    up_down_equivalent=True,  # ReLU(s * x) = s * ReLU(x) for s > 0
    norm_kind="layer",
    pre_norm="do_layer_norm_before",
)

_GPT_NEOX = Architecture(
    name="GPTNeoXForCausalLM",
    layers="gpt_neox.layers",
    embeddings=("gpt_neox.embed_in",),
    rotary="gpt_neox.rotary_emb",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",
    attn_linears=("attention.query_key_value", "attention.dense"),
    mlp_linears=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    norm_to_linears=(
        ("input_layernorm", ("attention.query_key_value",)),
        ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    q_to_k=("attention.query_key_value", "attention.query_key_value"),
    v_to_o=("attention.query_key_value", "attention.dense"),
    up_to_down=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    up_down_equivalent=False,  # GELU between: a pure scale does not cross it
    norm_kind="layer",
    fused_qkv=FusedQKV(linear="attention.query_key_value", layout="per_head"),
    parallel_residual="use_parallel_residual",
)

_QWEN3 = dataclasses.replace(
    _LLAMA, name="Qwen3ForCausalLM", qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
    other_norms=("self_attn.q_norm", "self_attn.k_norm"))

_GEMMA2 = dataclasses.replace(
    _LLAMA,
    name="Gemma2ForCausalLM",
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    # down(gelu_tanh(gate(x)) * up(x)): the scale on up's rows crosses the product, as for SiLU
    norm_offset=1.0,
    other_norms=("post_attention_layernorm", "post_feedforward_layernorm"),  # on the branch outputs: no linear
    logit_softcap="final_logit_softcapping",
)

_GEMMA3 = dataclasses.replace(
    _GEMMA2, name="Gemma3ForCausalLM", qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
    other_norms=("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"))

_PHI3 = dataclasses.replace(
    _LLAMA,
    name="Phi3ForCausalLM",
    attn_linears=("self_attn.qkv_proj", "self_attn.o_proj"),
    mlp_linears=("mlp.gate_up_proj", "mlp.down_proj"),
    norm_to_linears=(
        ("input_layernorm", ("self_attn.qkv_proj",)),
        ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    q_to_k=("self_attn.qkv_proj", "self_attn.qkv_proj"),
    v_to_o=("self_attn.qkv_proj", "self_attn.o_proj"),
    up_to_down=("mlp.gate_up_proj", "mlp.down_proj"),
    fused_qkv=FusedQKV(linear="self_attn.qkv_proj", layout="concat"),  # qkv[..., :q], [q:q+kv], [q+kv:]
    gate_up="mlp.gate_up_proj",  # gate, up = gate_up_proj(x).chunk(2, dim=-1)
)

_EXPERT_MLP = dict(
    mlp_linears=("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),
    norm_to_linears=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        # the router reads the norm's output too: it takes the scale's compensation (and stays full precision)
        ("post_attention_layernorm", ("mlp.gate", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
    ),
    up_to_down=("mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),  # one edge per expert
)

_MIXTRAL = dataclasses.replace(
    _LLAMA, name="MixtralForCausalLM", **_EXPERT_MLP,
    moe=MoE(experts="mlp.experts", router="mlp.gate", checkpoint=(
        (r"\.mlp\.", ".block_sparse_moe."), (r"(\.experts\.\d+)\.gate_proj", r"\1.w1"),
        (r"(\.experts\.\d+)\.up_proj", r"\1.w3"), (r"(\.experts\.\d+)\.down_proj", r"\1.w2"))),
)

_QWEN3_MOE = dataclasses.replace(
    _QWEN3, name="Qwen3MoeForCausalLM", **_EXPERT_MLP,
    moe=MoE(experts="mlp.experts", router="mlp.gate"),  # checkpoint: the same names
)

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({
    row.name: row
    for row in (
        _LLAMA,
        dataclasses.replace(_LLAMA, name="MistralForCausalLM"),
        dataclasses.replace(_LLAMA, name="Qwen2ForCausalLM"),  # same paths; q/k/v carry biases (see linear.bias)
        _QWEN3,
        _GEMMA2,
        _GEMMA3,
        _PHI3,
        _MIXTRAL,
        _QWEN3_MOE,
        _OPT,
        _GPT_NEOX,
    )
})


def supported_architectures() -> tuple[str, ...]:
    """Names accepted by :func:`get_architecture`, sorted."""
    return tuple(sorted(ARCHITECTURES))


def _config_of(config_or_model: Any) -> Any:
    return config_or_model.config if isinstance(config_or_model, nn.Module) else config_or_model


def get_architecture(config_or_model: Any) -> Architecture:
    """The row for a model (by its class name, else its config) or a config (by ``architectures[0]``).

    Raises :class:`ModelError` listing the supported names when the architecture is unknown.
    """
    if isinstance(config_or_model, nn.Module) and type(config_or_model).__name__ in ARCHITECTURES:
        return ARCHITECTURES[type(config_or_model).__name__]
    config = _config_of(config_or_model)
    names = getattr(config, "architectures", None) or []
    name = names[0] if names else None
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    found = name or (type(config_or_model).__name__ if isinstance(config_or_model, nn.Module) else "none")
    raise ModelError(
        f"unsupported architecture {found!r} (config.architectures={names or None}); "
        f"supported: {', '.join(supported_architectures())}"
    )


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    return dict(params) if isinstance(params, Mapping) else {}


def geometry(config: Any, arch: Architecture | None = None) -> Geometry:
    """Attention geometry of a config: hidden size, (kv) heads, head dim and how much of each head RoPE rotates.

    RoPE is on when the architecture row has a rotary module; its partial factor comes from
    ``config.rope_parameters["partial_rotary_factor"]`` (transformers 5 moves NeoX's ``rotary_pct`` there),
    falling back to a top-level ``partial_rotary_factor`` attribute, else 1.
    """
    arch = arch or get_architecture(config)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    if heads % kv_heads:
        raise ModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; fix the config")
    rope = arch.rotary is not None
    factor = _rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    rotary_dim = int(head_dim * (1.0 if factor is None else float(factor))) if rope else 0
    return Geometry(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope=rope, rotary_dim=rotary_dim)


def resolve(root: nn.Module, path: str) -> nn.Module | None:
    """Module at dotted ``path`` under ``root`` (None when an attribute on the way is None).

    Raises :class:`ModelError` when an attribute is missing, naming the path, so a renamed HF module fails loudly.
    """
    module: Any = root
    for part in path.split("."):
        if module is None:
            return None
        if not hasattr(module, part):
            raise ModelError(
                f"{type(root).__name__} has no module {path!r} (missing {part!r}); "
                "the architecture row does not match this transformers version"
            )
        module = getattr(module, part)
    if module is not None and not isinstance(module, nn.Module):
        raise ModelError(f"{type(root).__name__}.{path} is a {type(module).__name__}, not a module")
    return module


def get_blocks(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The ModuleList of decoder blocks of ``model``."""
    arch = arch or get_architecture(model)
    layers = resolve(model, arch.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{arch.name}: {arch.layers!r} is not a ModuleList of decoder blocks")
    return layers


def find_linears(block: nn.Module, arch: Architecture | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one block, keyed by block-relative name.

    With ``arch``: the row's linears first, in its forward order (each must exist, else :class:`ModelError`),
    then any other linear found, in module order. Without: all linears in module order.
    """
    found = {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
    if arch is None:
        return found
    names = [n for pattern in arch.linear_names for n in expand(block, pattern)]
    missing = [name for name in names if name not in found]
    if missing:
        raise ModelError(
            f"{arch.name} block {type(block).__name__} has no nn.Linear named {missing}; "
            "the architecture row does not match this model"
        )
    ordered = {name: found[name] for name in names}
    ordered.update((name, mod) for name, mod in found.items() if name not in ordered)
    return ordered


def expand(block: nn.Module, name: str) -> list[str]:
    """Block-relative names matching ``name``: itself, or with ``*`` replaced by every expert index present.

    A name with ``*`` whose experts are still one fused module (not yet split by :mod:`bitsmith.models.moe`)
    raises :class:`ModelError`.
    """
    if EXPERT not in name:
        return [name]
    parent, _, rest = name.partition(f".{EXPERT}.")
    container = resolve(block, parent)
    if not isinstance(container, nn.ModuleList):
        raise ModelError(f"{parent} of {type(block).__name__} is not a list of experts; split its fused experts "
                         "first (bitsmith.models.split_experts)")
    return [f"{parent}.{i}.{rest}" for i in range(len(container))]
