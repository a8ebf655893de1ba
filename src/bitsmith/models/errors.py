"""The one exception type for mistakes a user can make with a model (bad folder, unsupported architecture, ...)."""

from __future__ import annotations


class ModelError(ValueError):
    """A model cannot be loaded or walked; the message says what is wrong and how to fix it, in one line."""
