"""llm-compressor 0.14's ``llmcompressor.modeling.moe``: MoE preparation helpers, provided by
the ``llmc-moe`` distribution (an ImportError that names it when it is not installed)."""

from __future__ import annotations

import importlib
from typing import Any

PROVIDER = "llmc-moe"


def provided(module: str, name: str) -> Any:
    """``name`` from ``module`` of llmc-moe, or an ImportError that says what to install."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("llmc_moe"):
            raise
        raise ImportError(f"{name} comes with {PROVIDER}: pip install {PROVIDER}", name=name) from None
