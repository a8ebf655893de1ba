"""The exception type for mistakes a user can make with data (missing file, bad line, no tokenizer, ...):
:class:`bitsmith.errors.DataError`, re-exported here for the data layer."""

from __future__ import annotations

from ..errors import DataError

__all__ = ["DataError"]
