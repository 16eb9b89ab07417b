"""A third-party plugin: one modifier, registered only through its own entry point."""

from __future__ import annotations

import attrs
import torch

from llmc.api import Modifier, hookimpl


@attrs.define(kw_only=True)
class ScaleWeightsModifier(Modifier):
    """Multiply every Linear weight whose name contains ``match`` by ``factor``."""

    factor: float = 1.0
    match: str = "proj"

    def pipeline(self) -> str:
        return "datafree"

    def on_calibration_start(self, state) -> None:
        with torch.no_grad():
            for name, module in state.model.named_modules():
                if isinstance(module, torch.nn.Linear) and self.match in name:
                    module.weight.mul_(self.factor)


@hookimpl
def llmc_register_modifiers(register):
    register(ScaleWeightsModifier)
