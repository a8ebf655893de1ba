"""bitsmith: post-training quantization of large language models.

Layers (imports go one way only): ``formats`` (pure tensor math) → ``nn`` (quantized modules) → ``transforms`` →
``algorithms`` → ``models`` (the only place that knows Hugging Face module names) → ``pipeline`` → ``export``/``eval``
→ ``plan``/``run`` → ``cli``; ``errors`` and ``utils`` serve all.

Public API: ``bitsmith.quantize(model_dir, config, output, options)`` (:func:`bitsmith.run.quantize`, the
library form of ``bitsmith quantize``), ``bitsmith.QuantConfig``, ``bitsmith.RunOptions`` and
``bitsmith.load(path)`` (an output folder as a model of packed quantized linears).
"""

from .version import __version__  # noqa: F401  (public)


def __getattr__(name: str):
    """Lazy public API (keeps ``import bitsmith`` light)."""
    if name == "load":
        from .export.load import load

        return load
    if name in ("quantize", "RunOptions"):
        from . import run

        return getattr(run, name)
    if name == "QuantConfig":
        from .config import QuantConfig

        return QuantConfig
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")
