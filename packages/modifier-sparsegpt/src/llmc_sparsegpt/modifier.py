"""SparseGPTModifier: prune each Linear with SparseGPT at the end of its sequential layer."""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from typing import Any, ClassVar

import attrs
import torch
from compressed_tensors.utils import is_match, match_named_modules

from llmc import distributed
from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc_gptq.hessian import HessianAccumulator
from llmc_sparsegpt.prune import parse_mask_structure, sparsegpt_prune_batch

logger = logging.getLogger(__name__)

# float32 elements of weight per batched solve (the solve holds about four copies)
MAX_BATCH_ELEMENTS = 2**28


def _str_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {value!r}.")
    return float(value)


def _check_sparsity(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    for entry in value if isinstance(value, (list, tuple)) else ([] if value is None else [value]):
        if isinstance(entry, bool) or not isinstance(entry, (int, float)):
            raise TypeError(f"sparsity must be a number or a list of numbers, got {entry!r}.")
        _fraction(entry)


def _check_mask(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    parse_mask_structure(value)


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}.")


@attrs.define(kw_only=True)
class SparseGPTModifier(Modifier):
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

    sparsity: float | list[float] | None = attrs.field(default=None, validator=_check_sparsity)
    mask_structure: str = attrs.field(default="0:0", validator=_check_mask)
    sparsity_profile: str | None = None
    owl_m: int | None = None
    owl_lmbda: float | None = None
    block_size: int = attrs.field(default=128, validator=_positive)
    dampening_frac: float = attrs.field(default=0.01, validator=_positive)
    preserve_sparsity_mask: bool = False
    offload_hessians: bool = False
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=_str_list)
    ignore: list[str] = attrs.field(factory=list, converter=_str_list)
    sequential_targets: list[str] | None = None
    sequential_update: bool | None = None  # llm-compressor's deprecated switch: always on here

    _hessians: HessianAccumulator | None = attrs.field(default=None, init=False, repr=False)
    _pending: dict[torch.nn.Module, tuple[str, float]] = attrs.field(factory=dict, init=False, repr=False)
    solve_seconds: float = attrs.field(default=0.0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.sparsity_profile is not None:
            raise ValueError(
                f"sparsity_profile={self.sparsity_profile!r} (OWL) is not supported by llmc's SparseGPTModifier "
                "yet; give sparsity per target as a list instead."
            )
        if self.owl_m is not None or self.owl_lmbda is not None:
            raise ValueError("owl_m and owl_lmbda belong to sparsity_profile='owl', which llmc does not support yet.")
        if self.sequential_update is False:
            warnings.warn("sequential_update=False is not supported; layers are pruned one after another.",
                          DeprecationWarning, stacklevel=2)
        n, m = parse_mask_structure(self.mask_structure)
        if n == 0 and self.sparsity is None:
            raise ValueError("SparseGPTModifier needs sparsity= (e.g. 0.5), or an N:M mask_structure such as '2:4'.")
        if n and self.sparsity is not None and not isinstance(self.sparsity, list) and abs(self.sparsity - n / m) > 1e-6:
            logger.warning("mask_structure %s prunes %.0f%% of each row; sparsity=%s is ignored.",
                           self.mask_structure, 100 * n / m, self.sparsity)

    def pipeline(self) -> str:
        return "sequential"

    # --- which modules, at which sparsity ------------------------------------
    def _prunable(self, model: torch.nn.Module) -> dict[torch.nn.Module, tuple[str, float]]:
        """Each Linear inside a target (or a target itself), not ignored: its name and sparsity."""
        layers = list(match_named_modules(model, self.targets))
        if isinstance(self.sparsity, list) and len(self.sparsity) != len(layers):
            raise ValueError(
                f"sparsity lists {len(self.sparsity)} values but targets {self.targets} match "
                f"{len(layers)} modules; give one value per matched module."
            )
        n, m = parse_mask_structure(self.mask_structure)
        found: dict[torch.nn.Module, tuple[str, float]] = {}
        for index, (layer_name, layer) in enumerate(layers):
            sparsity = n / m if n else (self.sparsity[index] if isinstance(self.sparsity, list) else self.sparsity)
            for sub, module in layer.named_modules():
                name = f"{layer_name}.{sub}" if sub else layer_name
                if not isinstance(module, torch.nn.Linear) or module in found or is_match(name, module, self.ignore):
                    continue
                found[module] = (name, float(sparsity))  # type: ignore[arg-type]
        if not found:
            raise ValueError(
                f"SparseGPTModifier's targets {self.targets} (ignore {self.ignore}) select no Linear layer of "
                f"{type(model).__name__}; name the Linear layers or the modules that hold them."
            )
        return found

    # --- lifecycle ------------------------------------------------------------
    def on_initialize(self, state: State) -> None:
        self._pending = self._prunable(state.model)
        if any(name.endswith("lm_head") for name, _ in self._pending.values()):
            logger.warning("SparseGPT will prune lm_head; add 're:.*lm_head' to ignore if that is unintended.")
        logger.info("SparseGPT: %d Linear layers, mask %s", len(self._pending), self.mask_structure)

    def on_calibration_start(self, state: State) -> None:
        self._hessians = HessianAccumulator(lambda: state.observing, offload=self.offload_hessians)
        for module in self._pending:
            self._hessians.attach(module)

    def on_batch_end(self, state: State, batch_index: int) -> None:
        if self._hessians is not None:
            self._hessians.end_batch()

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        prefix = layer_name + "."
        self._prune([m for m, (name, _) in self._pending.items() if name.startswith(prefix)])

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        prefix = layer_name + "."
        for module in [m for m, (name, _) in self._pending.items() if name.startswith(prefix)]:
            del self._pending[module]

    def on_calibration_end(self, state: State) -> None:
        # modules outside every sequential target (or all of them, on the basic pipeline)
        self._prune(list(self._pending))
        if self._hessians is not None:
            self._hessians.detach()

    # --- the solves -------------------------------------------------------------
    def _prune(self, modules: list[torch.nn.Module]) -> None:
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
