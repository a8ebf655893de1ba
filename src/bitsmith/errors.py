"""bitsmith's own errors: the mistakes a user can make, each reported in one line naming the problem and the fix.

Every error bitsmith raises on purpose derives from :class:`BitsmithError`; the CLI turns exactly these into
``bitsmith: error: <message>`` and exit code 2. Anything else escaping the library is a bug and keeps its
traceback. The root derives from :class:`ValueError` so callers that caught ``ValueError`` before keep working.

Usable from every layer (like ``utils``); imports nothing from bitsmith.
"""

from __future__ import annotations


class BitsmithError(ValueError):
    """Root of bitsmith's errors: the message is one line saying what is wrong and how to fix it."""


class ConfigError(BitsmithError):
    """A recipe, format, granularity or algorithm setting that is invalid or impossible for the model."""


class ModelError(BitsmithError):
    """A model cannot be loaded or walked (bad folder, unsupported architecture, corrupt weights, ...)."""


class DataError(BitsmithError):
    """Data cannot be found or read (missing file, bad line, no tokenizer, ...)."""


class ExportError(BitsmithError):
    """A quantized folder cannot be read, exported or loaded in the requested format."""


class ResourceError(BitsmithError):
    """The run does not fit the memory (or other resource) it is given."""


class NumericsError(BitsmithError):
    """NaN or inf where the computation needs finite values (model weights, activations, training loss)."""


class UsageError(BitsmithError):
    """A command-line mistake (flag values, combinations)."""
class CheckpointError(BitsmithError):
    """A run checkpoint (OUTPUT.partial) is corrupt, from other settings, or not shared by every process."""
