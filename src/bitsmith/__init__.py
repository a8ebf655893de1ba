"""bitsmith: post-training quantization of large language models.

Layers (imports go one way only): ``formats`` (pure tensor math) → ``nn`` (quantized modules) → ``transforms`` →
``algorithms`` → ``models`` (the only place that knows Hugging Face module names) → ``export``/``eval`` → ``cli``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy public API (keeps ``import bitsmith`` light): ``bitsmith.load(path)`` reads a ``--pack`` folder."""
    if name == "load":
        from .export.load import load

        return load
    raise AttributeError(f"module 'bitsmith' has no attribute {name!r}")
