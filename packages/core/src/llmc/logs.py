"""Logging setup for entry points: console, and a timestamped file under log_dir."""

from __future__ import annotations

import logging
import time
from pathlib import Path

LOGGER = "llmc"


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def logger_names() -> list[str]:
    """llmc's logger and the top-level package logger of every plugin.

    Read from the plugin manager, which scanned the installed distributions once:
    scanning their metadata again costs each run tens of milliseconds.
    """
    from llmc.plugins import plugin_packages

    return [LOGGER, *sorted(plugin_packages() - {LOGGER})]


def configure(log_dir: str | None = None, name: str = "oneshot") -> logging.Handler | None:
    """Send llmc's and its plugins' logs to stderr (once) and, with ``log_dir``, to a new file there.

    Returns the file handler, for the caller to remove when the run ends.
    """
    loggers = [logging.getLogger(n) for n in logger_names()]
    for logger in loggers:
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if not any(getattr(h, "_llmc_console", False) for h in logger.handlers):
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter(_FORMAT))
            console._llmc_console = True  # type: ignore[attr-defined]
            logger.addHandler(console)
    if log_dir is None:
        return None
    path = Path(log_dir)
    path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.log")
    handler.setFormatter(logging.Formatter(_FORMAT))
    for logger in loggers:
        logger.addHandler(handler)
    return handler


def release(handler: logging.Handler | None) -> None:
    """Detach and close a file handler returned by :func:`configure`."""
    if handler is None:
        return
    for name in logger_names():
        logging.getLogger(name).removeHandler(handler)
    handler.close()
