"""What one-shot pruning modifiers share: llm-compressor 0.14's targets, sparsity and N:M
mask arguments, and the lifecycle that prunes each sequential layer's Linears as it ends."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import attrs
import torch
from compressed_tensors.utils import is_match, match_named_modules

from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc.quantization.config import as_list
from llmc_sparsegpt.prune import parse_mask_structure

logger = logging.getLogger(__name__)



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


@attrs.define(kw_only=True)
class PruningModifier(Modifier):
    """Base of the one-shot pruning modifiers: the Linear layers inside ``targets`` (or the
    targets themselves), but ``ignore``, are pruned to ``sparsity`` (one value, or one per matched
    target) or to an N:M ``mask_structure`` such as ``"2:4"``, each when its sequential layer
    ends. A subclass accumulates what it needs from ``on_calibration_start`` on and prunes in
    :meth:`prune` (given the modules and, in :attr:`_pending`, their names and sparsities)."""

    sparsity: float | list[float] | None = attrs.field(default=None, validator=_check_sparsity)
    mask_structure: str = attrs.field(default="0:0", validator=_check_mask)
    sparsity_profile: str | None = None
    owl_m: int | None = None
    owl_lmbda: float | None = None
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list)
    ignore: list[str] = attrs.field(factory=list, converter=as_list)
    sequential_targets: list[str] | None = None
    sequential_update: bool | None = None  # llm-compressor's deprecated switch: always on here

    _pending: dict[torch.nn.Module, tuple[str, float]] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.sparsity_profile is not None:
            raise ValueError(
                f"sparsity_profile={self.sparsity_profile!r} (OWL) is not supported by llmc "
                "yet; give sparsity per target as a list instead."
            )
        if self.owl_m is not None or self.owl_lmbda is not None:
            raise ValueError("owl_m and owl_lmbda belong to sparsity_profile='owl', which llmc does not support yet.")
        if self.sequential_update is False:
            warnings.warn("sequential_update=False is not supported; layers are pruned one after another.",
                          DeprecationWarning, stacklevel=2)
        n, m = parse_mask_structure(self.mask_structure)
        if n == 0 and self.sparsity is None:
            raise ValueError(f"{type(self).__name__} needs sparsity= (e.g. 0.5), or an N:M mask_structure such as '2:4'.")
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
                f"{type(self).__name__}'s targets {self.targets} (ignore {self.ignore}) select no Linear layer of "
                f"{type(model).__name__}; name the Linear layers or the modules that hold them."
            )
        return found

    # --- lifecycle ------------------------------------------------------------
    def on_initialize(self, state: State) -> None:
        self._pending = self._prunable(state.model)
        if any(name.endswith("lm_head") for name, _ in self._pending.values()):
            logger.warning("%s will prune lm_head; add 're:.*lm_head' to ignore if that is unintended.", type(self).__name__)
        logger.info("%s: %d Linear layers, mask %s", type(self).__name__, len(self._pending), self.mask_structure)

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        prefix = layer_name + "."
        self.prune([m for m, (name, _) in self._pending.items() if name.startswith(prefix)])

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        prefix = layer_name + "."
        for module in [m for m, (name, _) in self._pending.items() if name.startswith(prefix)]:
            del self._pending[module]

    def on_calibration_end(self, state: State) -> None:
        # modules outside every sequential target (or all of them, on the basic pipeline)
        self.prune(list(self._pending))

    def prune(self, modules: list[torch.nn.Module]) -> None:
        raise NotImplementedError
