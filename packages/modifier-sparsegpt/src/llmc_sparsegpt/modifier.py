"""SparseGPTModifier: prune each Linear with SparseGPT at the end of its sequential layer."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, ClassVar

import attrs
import torch

from llmc import distributed
from llmc.lifecycle import State
from llmc_gptq.hessian import HessianAccumulator
from llmc_sparsegpt.prune import parse_mask_structure, sparsegpt_prune_batch
from llmc_sparsegpt.sparsity import PruningModifier

logger = logging.getLogger(__name__)

# float32 elements of weight per batched solve (the solve holds about four copies)
MAX_BATCH_ELEMENTS = 2**28


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}.")


@attrs.define(kw_only=True)
class SparseGPTModifier(PruningModifier):
    """SparseGPT (Frantar & Alistarh, 2023): prune the Linear layers inside ``targets`` to
    ``sparsity`` (unstructured) or to an N:M ``mask_structure`` such as ``"2:4"``, updating the
    remaining weights against each layer's input Hessian so its output changes least.

    llm-compressor 0.14's arguments: ``targets`` names the modules whose Linear layers are
    pruned (the Linears themselves, or e.g. the decoder layers ``re:model.layers.\\d+$``), and a
    list ``sparsity`` gives one value per matched target. Runs on the sequential pipeline, so
    each layer calibrates on the previous layers' pruned outputs. The checkpoint keeps the
    zeros in dense tensors, as llm-compressor 0.14 saves (compressed-tensors has no sparse
    format since 0.19); a quantizing modifier after it (FP8, W4A16) compresses the rest.
    """

    data_parallel: ClassVar[bool] = True  # Hessians summed over the ranks

    block_size: int = attrs.field(default=128, validator=_positive)
    dampening_frac: float = attrs.field(default=0.01, validator=_positive)
    preserve_sparsity_mask: bool = False
    offload_hessians: bool = False

    _hessians: HessianAccumulator | None = attrs.field(default=None, init=False, repr=False)
    solve_seconds: float = attrs.field(default=0.0, init=False, repr=False)

    def on_calibration_start(self, state: State) -> None:
        self._hessians = HessianAccumulator(lambda: state.observing, offload=self.offload_hessians)
        for module in self._pending:
            self._hessians.attach(module)

    def on_batch_end(self, state: State, batch_index: int) -> None:
        if self._hessians is not None:
            self._hessians.end_batch()

    def on_calibration_end(self, state: State) -> None:
        super().on_calibration_end(state)
        if self._hessians is not None:
            self._hessians.detach()

    # --- the solves -------------------------------------------------------------
    def prune(self, modules: list[torch.nn.Module]) -> None:
        """Prune ``modules``: same-shaped weights in one batched solve each; under a distributed
        run the ranks' Hessians are summed first, each solve runs on one rank and its weights
        are broadcast."""
        assert self._hessians is not None
        if distributed.is_distributed():
            self._hessians.synchronize(modules)
        groups: dict[tuple, list[torch.nn.Module]] = defaultdict(list)
        for module in modules:
            if self._hessians.owner.get(module) is None:
                name = self._pending.pop(module)[0]
                logger.warning("%s saw no calibration data; left dense.", name)
                continue
            weight = module.weight
            groups[(tuple(weight.shape), weight.dtype, weight.device)].append(module)
        solves: list[list[torch.nn.Module]] = []
        for (shape, _, _), members in groups.items():
            per_solve = max(1, MAX_BATCH_ELEMENTS // (shape[0] * shape[1]))
            solves += [members[i : i + per_solve] for i in range(0, len(members), per_solve)]
        owners = distributed.assign([len(s) * s[0].weight.shape[0] * s[0].weight.shape[1] ** 2 for s in solves])
        n, m = parse_mask_structure(self.mask_structure)
        for solve, owner in zip(solves, owners, strict=True):
            hessians = [self._hessians.pop(module) for module in solve]
            names, sparsities = zip(*[self._pending.pop(module) for module in solve], strict=True)
            if owner != distributed.rank():
                continue
            device = solve[0].weight.device
            started = time.perf_counter()
            if len(solve) == 1 and hessians[0][1]:  # a Hessian nobody else needs: consumed in place
                stacked = [hessians[0][0].to(device)[None]]
            else:
                stacked = [torch.stack([h.to(device) for h, _ in hessians])]
            del hessians
            results = sparsegpt_prune_batch(
                torch.stack([module.weight.data for module in solve]),
                stacked,
                torch.tensor(sparsities, device=device),
                prune_n=n,
                prune_m=m,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                preserve_sparsity_mask=self.preserve_sparsity_mask,
            )
            seconds = time.perf_counter() - started
            self.solve_seconds += seconds
            for module, name, result in zip(solve, names, results, strict=True):
                module.weight.data.copy_(result.weight)
                logger.info("SparseGPT %s: %.1f%% zeros, relative error %.3e, %.2f s (%d in one solve)",
                            name, 100 * result.sparsity, result.relative_error, seconds, len(solve))
        for solve, owner in zip(solves, owners, strict=True):
            for module in solve:
                distributed.broadcast(module.weight.data, owner)
