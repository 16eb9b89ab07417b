"""REAPPruningModifier: drop each MoE layer's least salient experts as its layer ends."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch

from llmc import distributed
from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc.quantization.config import as_list
from llmc_reap.experts import Routing, keep_experts, moe_blocks, routing, set_expert_count

logger = logging.getLogger(__name__)



def _fraction(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"sparsity must be a fraction of the experts in (0, 1), got {value!r}.")


def _json_path(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not str(value).endswith(".json"):
        raise ValueError(f"report_path must end with .json, got {value!r}.")


class Saliency:
    """REAP's saliency of each expert of one block: the mean, over the (token, slot) pairs
    routed to it, of the routing weight times the L2 norm of the expert's output."""

    def __init__(self, experts: int) -> None:
        self.total: torch.Tensor | None = None  # float64, on the calibration device
        self.count: torch.Tensor | None = None
        self.experts = experts

    def add(self, expert: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> None:
        if self.total is None:
            self.total = torch.zeros(self.experts, dtype=torch.float64, device=output.device)
            self.count = torch.zeros_like(self.total)
        assert self.count is not None
        norms = torch.linalg.vector_norm(output.float(), dim=-1).double()
        self.total.index_add_(0, expert, weight.double() * norms)
        self.count.index_add_(0, expert, torch.ones_like(norms))

    def mean(self) -> torch.Tensor:
        """Summed over the ranks of a distributed run (collective)."""
        total = torch.zeros(self.experts, dtype=torch.float64) if self.total is None else self.total
        count = torch.zeros_like(total) if self.count is None else self.count
        total, count = distributed.all_reduce(total.clone()), distributed.all_reduce(count.clone())
        return (total / count.clamp(min=1)).cpu()


def retained_experts(saliency: torch.Tensor, drop: int, groups: int | None) -> list[int]:
    """The experts kept: all but the ``drop`` least salient, as many from each routing group
    (the router picks groups first), in their original order."""
    sizes = [len(saliency)] if groups is None else [len(saliency) // groups] * groups
    kept: list[int] = []
    start = 0
    for size in sizes:
        part = saliency[start : start + size]
        dropped = set(torch.topk(part, drop // len(sizes), largest=False).indices.tolist())
        kept += [start + i for i in range(size) if i not in dropped]
        start += size
    return kept


@attrs.define(kw_only=True)
class REAPPruningModifier(Modifier):
    """REAP (Lasby et al., 2025, arXiv 2510.13999): remove the ``sparsity`` fraction of each
    MoE layer's experts with the lowest saliency, the mean over the tokens routed to an expert
    of its routing weight times its output's L2 norm.

    Runs on the sequential pipeline: each layer's saliency is measured on the previous layers'
    pruned outputs and the layer is cut when it ends, so the next layer calibrates on the
    pruned model. The config's expert count is updated, and the checkpoint holds the retained
    experts renumbered from 0. ``report_path`` (a .json file) receives each layer's retained
    experts, by their original index. Needs the experts linearized by ``llmc-moe``.
    """

    data_parallel: ClassVar[bool] = True  # saliency sums reduced over the ranks

    sparsity: float = attrs.field(validator=_fraction)
    ignore: list[str] = attrs.field(factory=list, converter=as_list)
    report_path: str | None = attrs.field(default=None, validator=_json_path)

    _routing: Routing | None = attrs.field(default=None, init=False, repr=False)
    _blocks: dict[str, torch.nn.Module] = attrs.field(factory=dict, init=False, repr=False)
    _saliency: dict[str, Saliency] = attrs.field(factory=dict, init=False, repr=False)
    _removers: list[Any] = attrs.field(factory=list, init=False, repr=False)
    # per pruned block: the original indices of its retained experts, and every expert's saliency
    retained: dict[str, list[int]] = attrs.field(factory=dict, init=False, repr=False)
    saliency: dict[str, list[float]] = attrs.field(factory=dict, init=False, repr=False)

    def pipeline(self) -> str:
        return "sequential"

    @property
    def drop(self) -> int:
        """Experts dropped per block: the requested fraction, rounded down, then to an equal
        number per routing group."""
        assert self._routing is not None
        drop = int(self._routing.num_experts * self.sparsity)
        groups = self._routing.groups
        return drop if groups is None else round(drop / groups) * groups

    def on_initialize(self, state: State) -> None:
        self._routing = route = routing(state.model)
        self._blocks = moe_blocks(state.model, self.ignore)
        drop = self.drop
        if drop == 0:
            per = "" if route.groups is None else f" in each of {route.groups} routing groups"
            raise ValueError(
                f"sparsity={self.sparsity} drops no expert{per} of {route.num_experts}; raise it."
            )
        left = route.num_experts - drop
        reachable = left if route.groups is None else route.top_k_groups * (left // route.groups)  # type: ignore[operator]
        if route.top_k > reachable:
            raise ValueError(
                f"sparsity={self.sparsity} leaves {reachable} experts the router can reach, fewer than the "
                f"{route.top_k} it picks per token; lower the sparsity."
            )
        logger.info("REAP: %d MoE blocks, dropping %d of %d experts each", len(self._blocks), drop, route.num_experts)

    def on_calibration_start(self, state: State) -> None:
        assert self._routing is not None
        for name, block in self._blocks.items():
            saliency = self._saliency[name] = Saliency(block.experts.num_experts)

            def observe(expert: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, saliency=saliency) -> None:
                if state.observing:
                    saliency.add(expert, weight, output.detach())

            hooks = block.experts.routed_hooks
            hooks.append(observe)
            self._removers.append(lambda hooks=hooks, observe=observe: hooks.remove(observe))

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        self._prune([n for n in self._saliency if n.startswith(layer_name + ".")])

    def on_calibration_end(self, state: State) -> None:
        self._prune(list(self._saliency))  # blocks outside every sequential target
        for remove in self._removers:
            remove()
        self._removers.clear()
        if self.retained:
            assert self._routing is not None
            key, old = set_expert_count(state.model, self._routing.num_experts - self.drop)
            logger.info("REAP: config %s %d -> %d", key, old, self._routing.num_experts - self.drop)

    def on_finalize(self, state: State) -> None:
        if self.report_path is not None and distributed.rank() == 0:
            path = Path(self.report_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.retained))

    def _prune(self, names: list[str]) -> None:
        assert self._routing is not None
        for name in sorted(names):
            saliency = self._saliency.pop(name).mean()
            kept = retained_experts(saliency, self.drop, self._routing.groups)
            keep_experts(self._blocks[name], kept)
            self.retained[name] = kept
            self.saliency[name] = saliency.tolist()
            dropped = sorted(set(range(len(saliency))) - set(kept))
            logger.info("REAP %s: dropped experts %s (saliency %s)", name, dropped,
                        ", ".join(f"{saliency[i]:.3g}" for i in dropped))
