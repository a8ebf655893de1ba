"""Logging set-up. Library modules call ``logging.getLogger(__name__)``; only the CLI configures handlers."""

from __future__ import annotations

import logging


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root ``bitsmith`` logger for command-line use (0: INFO, >0: DEBUG, <0: WARNING)."""
    level = logging.INFO if verbosity == 0 else (logging.DEBUG if verbosity > 0 else logging.WARNING)
    logger = logging.getLogger("bitsmith")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
