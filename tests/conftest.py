"""Shared fixtures: tiny checkpoints built locally from transformers configs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from llmc import tiny

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


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer(2048)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``make(arch)`` saves (once per session) a tiny checkpoint of that architecture."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny.save_tiny(path, arch=arch, hidden_size=128, intermediate_size=256, seed=0)
            cache[arch] = path
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def llama_path(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture
def sample_ids() -> torch.Tensor:
    return torch.randint(4, 2048, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def fancy_provider(monkeypatch):
    """A first-party name whose package is not installed."""
    from llmc import plugins

    monkeypatch.setitem(plugins.KNOWN_PROVIDERS, "FancyModifier", "llmc-fancy")
    monkeypatch.setitem(plugins.KNOWN_PROVIDERS, "fancy-pipeline", "llmc-fancy")
