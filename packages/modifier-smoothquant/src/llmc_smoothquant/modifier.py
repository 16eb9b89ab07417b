"""SmoothQuantModifier: scale activation outliers into the weights, layer by layer."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import attrs
import torch

from llmc import distributed
from llmc.lifecycle import State
from llmc.mappings import ResolvedMapping, balance_input_source, fold_scales, resolve_mappings
from llmc.modifiers.base import Modifier

logger = logging.getLogger(__name__)


def _strength(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"smoothing_strength must be in [0, 1], got {value!r}.")


def log_equalization_scales(activation_max: torch.Tensor) -> torch.Tensor:
    """Logarithmic equalization (Wei et al., 2023, arXiv 2308.15987): s = max|X| / log2(2 + max|X|)
    per input channel, no weight statistic."""
    act = activation_max.float()
    scales = act / torch.log2(2 + act)
    return torch.where(scales > 0, scales, torch.ones_like(scales)).clamp(min=1e-5)


def smoothing_scales(
    activation_max: torch.Tensor, balance_weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per input channel; max|W| over every balance layer."""
    weight_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in balance_weights]).amax(dim=0)
    act = activation_max.float().to(weight_max.device)
    scales = act.pow(alpha) / weight_max.pow(1.0 - alpha)
    # channels that never fired (or a zero weight column) keep their scale
    return torch.where(torch.isfinite(scales) & (scales > 0), scales, torch.ones_like(scales)).clamp(min=1e-5)


@attrs.define(kw_only=True)
class SmoothQuantModifier(Modifier):
    """SmoothQuant: divide each smooth layer's output channels by s, multiply the balance
    layers' input columns by s, so activations become easy to quantize and the model's
    function is unchanged. Run it before a W8A8 quantization modifier.
    """

    data_parallel: ClassVar[bool] = True  # activation maxima reduced over the ranks
    smoothing_strength: float = attrs.field(default=0.5, validator=_strength)
    mappings: list[Any] | None = None
    ignore: list[str] = attrs.field(factory=list)
    num_calibration_steps: int | None = None
    # llm-compressor's choice of statistic: "smoothquant", or "log_equalization" (no weights)
    algorithm: str = attrs.field(default="smoothquant", validator=attrs.validators.in_(["smoothquant", "log_equalization"]))

    _resolved: list[ResolvedMapping] = attrs.field(factory=list, init=False, repr=False)
    _max: dict[str, torch.Tensor] = attrs.field(factory=dict, init=False, repr=False)
    _batches: int = attrs.field(default=0, init=False, repr=False)

    def pipeline(self) -> str:
        return "sequential"

    def on_initialize(self, state: State) -> None:
        self._resolved = resolve_mappings(state.model, self.mappings, "smoothquant", self.ignore)
        logger.info("SmoothQuant: %d smooth layers, alpha %.2f", len(self._resolved), self.smoothing_strength)

    def on_calibration_start(self, state: State) -> None:
        for mapping in self._resolved:
            name = mapping.smooth_name

            def record(x: torch.Tensor, name: str = name) -> None:
                if self.num_calibration_steps is not None and self._batches >= self.num_calibration_steps:
                    return
                x = x.detach()
                current = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
                previous = self._max.get(name)
                self._max[name] = current if previous is None else torch.maximum(previous, current)

            module, output = balance_input_source(mapping)
            self.observe(state, module, record, output=output)

    def on_batch_end(self, state: State, batch_index: int) -> None:
        self._batches += 1

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        self._batches = 0  # the sequential pipeline replays the calibration batches per layer
        self._smooth([m for m in self._resolved if m.smooth_name.startswith(layer_name + ".")])

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        for mapping in [m for m in self._resolved if m.smooth_name.startswith(layer_name + ".")]:
            self._resolved.remove(mapping)
            self._max.pop(mapping.smooth_name, None)

    def on_calibration_end(self, state: State) -> None:
        self._smooth(list(self._resolved))

    def _synchronize(self, mappings: list[ResolvedMapping]) -> None:
        """The largest activation over the ranks (a distributed run: collective, the same
        mappings in the same order everywhere; -1 marks a channel no rank saw)."""
        if not distributed.is_distributed():
            return
        for mapping in mappings:
            weight = mapping.balance[0].weight
            local = self._max.get(mapping.smooth_name)
            reduced = distributed.all_reduce(
                torch.full((weight.shape[1],), -1.0, device=weight.device) if local is None else local, op="max"
            )
            if bool((reduced >= 0).all()):
                self._max[mapping.smooth_name] = reduced

    def _smooth(self, mappings: list[ResolvedMapping]) -> None:
        self._synchronize(mappings)
        for mapping in mappings:
            self._resolved.remove(mapping)
            activation_max = self._max.pop(mapping.smooth_name, None)
            if activation_max is None:
                logger.warning("SmoothQuant: %s saw no calibration data; left as is.", mapping.smooth_name)
                continue
            if self.algorithm == "log_equalization":
                scales = log_equalization_scales(activation_max).to(mapping.balance[0].weight.device)
            else:
                scales = smoothing_scales(
                    activation_max, [layer.weight for layer in mapping.balance], self.smoothing_strength
                )
            fold_scales(mapping, scales)
            logger.debug("SmoothQuant %s: scales in [%.3g, %.3g]", mapping.smooth_name, scales.min(), scales.max())


@attrs.define(kw_only=True)
class LogarithmicEqualizationModifier(SmoothQuantModifier):
    """llm-compressor's name for ``SmoothQuantModifier(algorithm="log_equalization")``."""

    algorithm: str = attrs.field(default="log_equalization", validator=attrs.validators.in_(["log_equalization"]))
