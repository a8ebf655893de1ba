"""bitsmith.data: calibration and evaluation data.

- :mod:`.sources`: :func:`resolve_source` (dataset names, ``.txt``/``.jsonl`` files, split directories) and the
  table of named datasets with their GPTQ/OmniQuant join rules.
- :mod:`.readers`: reading documents; every user mistake is one clear :class:`DataError`.
- :mod:`.tokens`: :func:`load_tokens`, :func:`calibration_samples`, :func:`eval_windows`.
"""

from __future__ import annotations

from .errors import DataError
from .readers import Documents, read_documents
from .sources import DATASETS, HubSpec, JoinRule, ResolvedSource, eval_token_limit, normalize_split, resolve_source
from .tokens import calibration_samples, eval_windows, load_tokens

__all__ = [
    "DATASETS", "DataError", "Documents", "HubSpec", "JoinRule", "ResolvedSource", "calibration_samples",
    "eval_token_limit", "eval_windows", "load_tokens", "normalize_split", "read_documents", "resolve_source",
]
