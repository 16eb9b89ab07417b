"""llm-compressor 0.14's ``llmcompressor.modeling.moe.linearize``: ``linearize_moe(model)`` turns
every fused experts module into one Linear per expert and projection (llmc-moe's
:func:`llmc_moe.linearize`; ``oneshot`` does it itself)."""

from __future__ import annotations

from typing import Any

from llmc.modeling.moe import provided


def __getattr__(name: str) -> Any:
    if name == "linearize_moe":
        return provided("llmc_moe.linearize", "linearize")
    raise AttributeError(name)
