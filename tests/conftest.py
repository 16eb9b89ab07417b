"""Fixtures of the cross-package tests; the tiny checkpoints come from llmc.testing (a pytest plugin)."""

from __future__ import annotations

import logging

import pytest

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma"]


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    logging.getLogger("llmc").setLevel(logging.INFO)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures the process's logging, as a command does: put it back after a test."""
    from llmc import logs

    root = logging.getLogger()
    handlers, levels = list(root.handlers), {n: logging.getLogger(n).level for n in logs.logger_names()}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def fancy_provider(monkeypatch):
    """A first-party name whose package is not installed."""
    from llmc import plugins

    monkeypatch.setitem(plugins.KNOWN_PROVIDERS, "FancyModifier", "llmc-fancy")
    monkeypatch.setitem(plugins.KNOWN_PROVIDERS, "fancy-pipeline", "llmc-fancy")
