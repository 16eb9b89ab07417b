"""WandaPruningModifier: prune each Linear by |W| × ‖X‖ at the end of its sequential layer."""

from __future__ import annotations

import logging
from typing import ClassVar

import attrs
import torch

from llmc import distributed
from llmc.lifecycle import State
from llmc_sparsegpt.prune import parse_mask_structure
from llmc_sparsegpt.sparsity import PruningModifier
from llmc_wanda.prune import wanda_prune

logger = logging.getLogger(__name__)


@attrs.define(kw_only=True)
class WandaPruningModifier(PruningModifier):
    """Wanda (Sun et al., 2023, arXiv 2306.11695): prune each Linear inside ``targets`` by the
    product of a weight's magnitude and its input channel's norm over the calibration tokens,
    per output row, to ``sparsity`` or an N:M ``mask_structure``; no weight is updated (no
    Hessian, no solve). llm-compressor 0.14's arguments (those of ``SparseGPTModifier``
    without its solver's); runs on the sequential pipeline, so each layer is measured on the
    previous layers' pruned outputs."""

    data_parallel: ClassVar[bool] = True  # the channels' sums of squares summed over the ranks

    _squares: dict[torch.nn.Module, torch.Tensor] = attrs.field(factory=dict, init=False, repr=False)

    def on_calibration_start(self, state: State) -> None:
        for module in self._pending:

            def add(x: torch.Tensor, module: torch.nn.Module = module) -> None:
                squares = x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
                previous = self._squares.get(module)
                self._squares[module] = squares if previous is None else previous + squares

            self.observe(state, module, add)

    def prune(self, modules: list[torch.nn.Module]) -> None:
        n, m = parse_mask_structure(self.mask_structure)
        for module in modules:
            name, sparsity = self._pending.pop(module)
            squares = self._squares.pop(module, None)
            if distributed.is_distributed():
                local = torch.zeros(module.weight.shape[1], device=module.weight.device) if squares is None else squares
                squares = distributed.all_reduce(local)
            if squares is None:
                logger.warning("%s saw no calibration data; left dense.", name)
                continue
            module.weight.data.copy_(wanda_prune(module.weight.data, squares.to(module.weight.device), sparsity, n, m))
            zeros = float((module.weight == 0).float().mean())
            logger.info("Wanda %s: %.1f%% zeros", name, 100 * zeros)
