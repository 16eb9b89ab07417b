"""Helpers llm-compressor's example scripts import from ``llmcompressor.utils``, same names."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

ModelType = TypeVar("ModelType", bound=torch.nn.Module)


def dispatch_for_generation(model: ModelType, *args: Any, **kwargs: Any) -> ModelType:
    """Spread ``model`` over the available devices for ``generate`` (kept on them where it fits,
    else partly offloaded), as llm-compressor's examples do after ``oneshot``: compressed-tensors'
    ``dispatch_model``, whose arguments (``device_memory``, ``extra_memory``,
    ``no_split_modules``) it takes. Without an accelerator the model stays on the CPU."""
    from compressed_tensors.offload import dispatch_model

    return dispatch_model(model, *args, **kwargs)
