"""llm-compressor 0.14's ``llmcompressor.modeling.moe.cohere2_moe``: Cohere2-MoE made ready for
SpinQuant (see :mod:`llmc_moe.cohere2`)."""

from __future__ import annotations

from typing import Any

from llmc.modeling.moe import provided

PROVIDED = ("LinearRouter", "prepare_cohere2_moe_for_spinquant")


def __getattr__(name: str) -> Any:
    if name in PROVIDED:
        return provided("llmc_moe.cohere2", name)
    raise AttributeError(name)
