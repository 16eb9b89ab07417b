"""Fused experts in a safetensors checkpoint, split per expert for ``model_free_ptq``.

Some families' checkpoints store experts fused, as the model holds them
(gpt-oss: ``mlp.experts.gate_up_proj`` of shape experts x hidden x 2·intermediate,
interleaved, with biases). This converter cuts each expert out with the same
:class:`~llmc_moe.layout.FusedLayout` that linearization uses, under the same
names, so ``model_free_ptq`` quantizes one 2-D weight per expert and writes what
``oneshot`` writes for that model. The layout comes from the model's structure,
built on the meta device from ``config.json``: no weight is read for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import torch

from llmc_moe.experts import contiguous_copy
from llmc_moe.layout import FusedLayout, ProjectionNames, projection_names
from llmc_moe.linearize import fused_experts

logger = logging.getLogger(__name__)


def meta_model(checkpoint: Path) -> torch.nn.Module | None:
    """The checkpoint's model, built without memory from its config.json, or None."""
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        return None
    try:
        import transformers

        from llmc.model_loading import build_saved

        config = transformers.AutoConfig.from_pretrained(str(checkpoint))
        with torch.device("meta"):
            return build_saved(config)
    except Exception as exc:  # an architecture transformers does not know: nothing to split
        logger.debug("no model structure for %s: %s", checkpoint, exc)
        return None


@attrs.frozen
class FusedExpertsConverter:
    """A compressed-tensors ``Converter``: fused expert tensors in, per-expert tensors out."""

    layouts: dict[str, FusedLayout]  # experts module name -> its layout
    names: ProjectionNames

    @classmethod
    def for_checkpoint(cls, checkpoint: Path) -> FusedExpertsConverter | None:
        model = meta_model(Path(checkpoint))
        if model is None:
            return None
        layouts = {name: layout for name, _, layout in fused_experts(model)}
        return cls(layouts, projection_names(model)) if layouts else None

    def _owner(self, tensor_name: str) -> tuple[str, FusedLayout, str] | None:
        module, _, param = tensor_name.rpartition(".")
        layout = self.layouts.get(module)
        if layout is None or param not in layout.parameters():
            return None
        return module, layout, param

    def process(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            owner = self._owner(name)
            if owner is None:
                out[name] = tensor
                continue
            module, layout, param = owner
            kind = "bias" if param.endswith("_bias") else "weight"
            for index in range(tensor.shape[0]):
                for role, piece in layout.split(param, tensor, index).items():
                    copy = piece if piece.device.type == "meta" else contiguous_copy(piece)
                    out[f"{module}.{index}.{self.names.of(role)}.{kind}"] = copy
        return out

    def validate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.process(tensors)

    def get_dependencies(self, tensor_name: str) -> list[str]:
        return []

    def update_config(self, config: Any) -> Any:
        return config
