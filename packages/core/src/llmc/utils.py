"""Helpers llm-compressor's example scripts import from ``llmcompressor.utils``, same names."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

# device maps that ask compressed-tensors to offload at load; llmc loads those on the CPU
OFFLOAD_DEVICE_MAPS = ("auto_offload", "disk")

ModelType = TypeVar("ModelType", bound=torch.nn.Module)


def dispatch_for_generation(model: ModelType, *args: Any, **kwargs: Any) -> ModelType:
    """Spread ``model`` over the available devices for ``generate`` (kept on them where it fits,
    else partly offloaded), as llm-compressor's examples do after ``oneshot``: compressed-tensors'
    ``dispatch_model``, whose arguments (``device_memory``, ``extra_memory``,
    ``no_split_modules``) it takes. Without an accelerator the model stays on the CPU."""
    from compressed_tensors.offload import dispatch_model

    return dispatch_model(model, *args, **kwargs)


@contextlib.contextmanager
def load_context(model_cls: Any = None) -> Iterator[None]:
    """llm-compressor 0.14's loading context: ``model_cls.from_pretrained`` (default
    ``AutoModelForCausalLM``) inside it returns the model as ``oneshot`` will calibrate it.

    0.14 loads with compressed-tensors' offloading and linearizes MoE experts at load. llmc's
    pipelines bring one layer at a time to the accelerator themselves, so here the model is
    loaded on the CPU: ``device_map="auto_offload"`` or ``"disk"`` (compressed-tensors' names)
    become a CPU load, any other dispatch is taken off, and the installed model patches are
    applied (llmc-moe's linearized experts), as ``oneshot`` would apply them.
    """
    from compressed_tensors.utils import patch_attr
    from transformers import AutoModelForCausalLM

    from llmc.model_loading import apply_patches, undispatch

    model_cls = model_cls or AutoModelForCausalLM
    original = model_cls.from_pretrained

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device_map") in OFFLOAD_DEVICE_MAPS:
            logger.info(
                "device_map=%r: loading on the CPU; llmc's pipelines bring one layer at a time to the "
                "accelerator.", kwargs["device_map"],
            )
            for key in ("device_map", "max_memory", "offload_folder"):
                kwargs.pop(key, None)
        model = original(*args, **kwargs)
        undispatch(model)
        apply_patches(model)
        return model

    with patch_attr(model_cls, "from_pretrained", classmethod(from_pretrained)):
        yield
