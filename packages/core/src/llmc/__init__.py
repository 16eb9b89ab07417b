"""llmc: compress Hugging Face LLMs into compressed-tensors checkpoints.

Entry points: :func:`oneshot`. Modifiers: ``from llmc.modifiers import ...``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["oneshot", "__version__"]


def oneshot(**kwargs: Any):
    """Load a model, run a recipe of modifiers over calibration data, save it.

    Takes llm-compressor's oneshot arguments; see :mod:`llmc.args`.
    """
    from llmc.entrypoints.oneshot import oneshot as _oneshot

    return _oneshot(**kwargs)
