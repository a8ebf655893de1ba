"""bitsmith: post-training quantization of large language models.

Layers (imports go one way only): ``formats`` (pure tensor math) → ``nn`` (quantized modules) → ``transforms`` →
``algorithms`` → ``models`` (the only place that knows Hugging Face module names) → ``export``/``eval`` → ``cli``.
"""

__version__ = "0.1.0"
