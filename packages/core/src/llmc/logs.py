"""Logging for llmc's entry points, as a library should do it.

The application owns the handlers: where the root logger has any (``logging.basicConfig``
in a script, the ``llmc`` command's own setup), llmc's records propagate to them and llmc
adds none, so no line prints twice. Only where nothing is configured do the entry points
add a console handler of their own to llmc's loggers, or a script would show no progress
at all. Console lines go through ``tqdm.write``, so a live progress bar is not broken
mid-line. ``LLMC_LOG_LEVEL`` (or the CLI's ``--log-level``) sets llmc's level (INFO by
default); ``log_dir`` adds a timestamped file for one run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

LOGGER = "llmc"
LEVEL_VARIABLE = "LLMC_LOG_LEVEL"

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TqdmHandler(logging.StreamHandler):
    """A console handler that prints above live tqdm bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging must not raise)
            self.handleError(record)


def console_handler() -> logging.Handler:
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def logger_names() -> list[str]:
    """llmc's logger and the top-level package logger of every plugin.

    Read from the plugin manager, which scanned the installed distributions once:
    scanning their metadata again costs each run tens of milliseconds.
    """
    from llmc.plugins import plugin_packages

    return [LOGGER, *sorted(plugin_packages() - {LOGGER})]


def level(name: str | None = None) -> int:
    """``name`` (or ``$LLMC_LOG_LEVEL``, else INFO) as a logging level; a bad name is an error."""
    text = (name or os.environ.get(LEVEL_VARIABLE) or "INFO").upper()
    value = logging.getLevelName(text)
    if not isinstance(value, int):
        raise ValueError(f"Unknown log level {text!r}; use DEBUG, INFO, WARNING or ERROR.")
    return value


def configure_cli(log_level: str | None = None) -> None:
    """The ``llmc`` command's own logging: other libraries' warnings, llmc's chosen level."""
    chosen = level(log_level)
    logging.basicConfig(level=logging.WARNING, handlers=[console_handler()], force=True)
    for name in logger_names():
        logging.getLogger(name).setLevel(chosen)


def configure(log_dir: str | None = None, name: str = "oneshot") -> logging.Handler | None:
    """Show llmc's and its plugins' logs where the application configured nothing and, with
    ``log_dir``, write them to a new file there.

    Returns the file handler, for the caller to remove when the run ends.
    """
    loggers = [logging.getLogger(n) for n in logger_names()]
    configured = logging.getLogger().hasHandlers()
    for logger in loggers:
        if logger.level == logging.NOTSET:
            logger.setLevel(level())
        ours = [h for h in logger.handlers if getattr(h, "_llmc_console", False)]
        if configured:  # the application's handlers print llmc's records: ours would repeat them
            for handler in ours:
                logger.removeHandler(handler)
        elif not ours:
            console = console_handler()
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
