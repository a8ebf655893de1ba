"""The one exception type for mistakes a user can make with data (missing file, bad line, no tokenizer, ...)."""

from __future__ import annotations


class DataError(ValueError):
    """Data cannot be found or read; the message says what is wrong and how to fix it, in one line."""
