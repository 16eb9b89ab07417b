"""llm-compressor's import path ``llmcompressor.modifiers.autoround``: every modifier name
resolves through the plugin registry, as in :mod:`llmc.modifiers`, so a script needs only
``llmcompressor`` replaced by ``llmc``."""

from __future__ import annotations

from typing import Any

from llmc.modifiers import __dir__, __getattr__  # noqa: F401


def fix_batch_if_needed(batch: dict[str, Any]) -> dict[str, Any]:
    """llm-compressor 0.14's ``dataset.map`` helper for its AutoRound: it zeroes the last
    position of an all-ones attention mask, which the auto-round library needs. llmc's
    AutoRound takes any mask, so the row is returned unchanged (every token calibrates)."""
    return batch
