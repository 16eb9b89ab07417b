"""Model patches and calibration contexts, contributed by plugins.

A patch fixes or adapts one family of models: ``apply`` runs once after the
model is loaded (e.g. replace a fused MoE block by calibratable experts),
``calibration_context`` wraps calibration (e.g. send every token through every
expert so that all of them see data), and ``checkpoint_converter`` does to a
safetensors checkpoint what ``apply`` does to a model, for ``model_free_ptq``
(which never builds the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llmc.args import DatasetArguments


class ModelPatch:
    """Base class for patches registered through ``llmc_register_model_patches``."""

    name: str = "model-patch"

    def matches(self, model: torch.nn.Module) -> bool:
        """Whether this patch applies to ``model``."""
        return False

    def apply(self, model: torch.nn.Module) -> None:
        """Adapt the loaded model in place; called once, before any modifier."""

    @contextlib.contextmanager
    def calibration_context(
        self, model: torch.nn.Module, dataset_args: DatasetArguments
    ) -> Iterator[None]:
        """Wrap calibration forward passes; undo any temporary change on exit."""
        yield

    def checkpoint_converter(self, checkpoint: Path) -> Any | None:
        """A compressed-tensors ``Converter`` that ``model_free_ptq`` runs on every shard of
        the checkpoint folder ``checkpoint`` before quantizing it, or None when this patch has
        nothing to change there. It must write the tensor names and values that ``apply``
        gives the model, so that both entry points write the same checkpoint."""
        return None


def matching_patches(model: torch.nn.Module) -> list[Any]:
    from llmc.plugins import get_registry

    return [p for p in (r.obj for r in get_registry().of_kind("model_patch")) if p.matches(model)]


def checkpoint_converters(checkpoint: Path) -> list[Any]:
    """The converters every installed patch offers for the checkpoint at ``checkpoint``."""
    from llmc.plugins import get_registry

    found = (r.obj.checkpoint_converter(checkpoint) for r in get_registry().of_kind("model_patch"))
    return [c for c in found if c is not None]
