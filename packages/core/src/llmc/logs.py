"""Logging setup for entry points: console, and a timestamped file under log_dir."""

from __future__ import annotations

import logging
import time
from pathlib import Path

LOGGER = "llmc"


def configure(log_dir: str | None = None, name: str = "oneshot") -> logging.Handler | None:
    """Send llmc's logs to stderr (once) and, with ``log_dir``, to a new file there."""
    logger = logging.getLogger(LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(getattr(h, "_llmc_console", False) for h in logger.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        console._llmc_console = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    if log_dir is None:
        return None
    path = Path(log_dir)
    path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    return handler
