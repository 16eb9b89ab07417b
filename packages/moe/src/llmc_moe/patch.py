"""The model patch: linearize fused experts after loading, calibrate every expert.

Registered through ``llmc_register_model_patches``; oneshot applies it to every
model that holds fused experts and enters its calibration context around the
recipe's stages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmc.patches import ModelPatch
from llmc_moe.linearize import fused_experts, linear_experts, linearize

if TYPE_CHECKING:
    from llmc.args import DatasetArguments

logger = logging.getLogger(__name__)


class MoEPatch(ModelPatch):
    """Fused MoE experts become one Linear per expert and projection (see :mod:`llmc_moe`)."""

    name = "moe-linear-experts"

    def matches(self, model: torch.nn.Module) -> bool:
        return bool(fused_experts(model)) or bool(linear_experts(model))

    def apply(self, model: torch.nn.Module) -> None:
        linearize(model)

    @contextlib.contextmanager
    def calibration_context(
        self, model: torch.nn.Module, dataset_args: DatasetArguments
    ) -> Iterator[None]:
        """``moe_calibrate_all_experts``: every token through every expert while calibrating.
        On exit, ``min_tokens_per_module`` warns by name about the experts that ran on fewer
        than that fraction of the tokens their layer saw."""
        modules = linear_experts(model)
        every = dataset_args.moe_calibrate_all_experts
        for _, module in modules:
            module.all_experts = every
            module.reset_counts()
        try:
            yield
        finally:
            for _, module in modules:
                module.all_experts = False
                module.clear_stacks()
        warn_starved_experts(modules, dataset_args.min_tokens_per_module)

    def checkpoint_converter(self, checkpoint: Path) -> Any | None:
        from llmc_moe.checkpoint import FusedExpertsConverter

        return FusedExpertsConverter.for_checkpoint(checkpoint)


def warn_starved_experts(modules: list[tuple[str, Any]], fraction: float | None) -> None:
    if not fraction:
        return
    starved = []
    for name, module in modules:
        if not module.tokens_total:
            continue
        for index, seen in enumerate(module.tokens_seen):
            if seen < fraction * module.tokens_total:
                starved.append(f"{name}.{index} ({seen}/{module.tokens_total})")
    if starved:
        logger.warning(
            "%d experts ran on less than min_tokens_per_module=%g of their layer's calibration "
            "tokens; their scales rest on little data: %s. Calibrate on more samples, or with "
            "moe_calibrate_all_experts=True.",
            len(starved),
            fraction,
            ", ".join(starved),
        )
