"""The exception type for mistakes a user can make with a model (bad folder, unsupported architecture, ...):
:class:`bitsmith.errors.ModelError`, re-exported here for the models layer."""

from __future__ import annotations

from ..errors import ModelError

__all__ = ["ModelError"]
