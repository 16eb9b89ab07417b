"""AutoRoundModifier: per decoder layer, rounding and clipping learned from the layer's outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

from llmc.api import QuantizationModifier, State, weight_qparams
from llmc.quantization.calibrate import copy_into, fused_global_scales
from llmc_autoround.rounding import (
    SUPPORTED_STRATEGIES,
    RoundingParams,
    RoundTrip,
    WeightRounding,
    int_round_trip_eager,
)
from llmc_autoround.samples import LayerSamples
from llmc_autoround.tuning import BatchSampler, TuningResult, signed_gradient_descent

logger = logging.getLogger(__name__)


def _at_least(least: int) -> Callable[[Any, attrs.Attribute, int], None]:
    def check(instance: Any, attribute: attrs.Attribute, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive integer" if least else "a non-negative integer (0: round to nearest)"
            raise ValueError(f"{attribute.name} must be {kind}, got {value!r}.")

    return check


def _positive_or_none(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive (or None for 1/iters), got {value!r}.")


def _several(device_ids: str | None) -> bool:
    return device_ids is not None and ("," in str(device_ids) or str(device_ids).strip() == "auto")


def _device_of(device_ids: str) -> torch.device:
    text = str(device_ids).strip()
    return torch.device(f"cuda:{text}" if text.isdigit() else text)


def _stackable(modules: list[tuple[str, torch.nn.Module]]) -> list[list[tuple[str, torch.nn.Module]]]:
    """``modules`` in sets that one :class:`WeightRounding` rounds together: the same weight
    arguments, dtypes and group length (the tensor strategy's groups are whole weights)."""
    sets: dict[tuple, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in modules:
        args = module.quantization_scheme.weights
        length = {QuantizationStrategy.TENSOR: module.weight.numel(), QuantizationStrategy.CHANNEL: module.weight.shape[-1]}
        key = (args.model_dump_json(), module.weight.dtype, module.weight_scale.dtype,
               length.get(QuantizationStrategy(args.strategy), args.group_size))
        sets.setdefault(key, []).append((name, module))
    return list(sets.values())


def _check_scheme(args: QuantizationArgs, group: str) -> None:
    if args.strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(
            f"AutoRoundModifier: config group {group!r} uses the {QuantizationStrategy(args.strategy).value!r} weight strategy; "
            f"AutoRound supports {', '.join(s.value for s in SUPPORTED_STRATEGIES)} "
            "(e.g. W4A16, W4A16_ASYM, W8A16, NVFP4A16, MXFP4A16)."
        )
    if args.type == QuantizationType.FLOAT and args.num_bits not in (4, 8):
        raise ValueError(f"AutoRoundModifier: config group {group!r}: float weights of {args.num_bits} bits are not supported.")


@attrs.define(kw_only=True)
class AutoRoundModifier(QuantizationModifier):
    """AutoRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for
    the Quantization of LLMs", 2024) over the modules a quantization scheme targets.

    For each decoder layer of the sequential pipeline, on the inputs that the already
    quantized layers before it produce: per weight, a rounding offset V in [-0.5, 0.5] per
    element and factors in [0, 1] on each group's min and max are trained with signed
    gradient descent (``iters`` steps, ``batch_size`` sequences each, learning rate ``lr``
    decaying linearly to 0) to minimise the mean squared error between the layer's output
    with quantized weights and its unquantized output; the iteration with the lowest loss
    is kept and written as compressed-tensors weights and qparams.
    """

    weights_round_to_nearest: ClassVar[bool] = False  # learned rounding, not the nearest
    strength: ClassVar[int] = 3  # for `llmc demo`: AutoRound first, then GPTQ, AWQ, round-to-nearest
    data_parallel: ClassVar[bool] = False  # trains on one process's batches: not yet over ranks

    # 0: no tuning, every weight rounded to nearest (optimized unless disable_opt_rtn) and
    # activations calibrated as QuantizationModifier calibrates them (AutoRound's RTN mode)
    iters: int = attrs.field(default=200, validator=_at_least(0))
    batch_size: int = attrs.field(default=8, validator=_at_least(1))
    lr: float | None = attrs.field(default=None, validator=_positive_or_none)
    # compile the weights' rounding (elementwise, run every iteration) on CUDA. Off by default,
    # unlike llm-compressor: on the benchmark model compiling cost more than it saved (62.7 s
    # against 47.6 s, benchmarks/README.md); it can pay off for very large layers
    enable_torch_compile: bool = False
    # modules AutoRound cannot tune (outside every decoder layer, or given no data) are
    # rounded to nearest: over the range with the least rounding error (AutoRound's
    # "optimized RTN"), or with disable_opt_rtn over the plain min-max range
    disable_opt_rtn: bool = False
    # llm-compressor's device map for tuning; llmc tunes on one device, oneshot's by default
    # (several devices are taken as that one, with a warning)
    device_ids: str | None = None

    _captured: dict[str, list[tuple[tuple, dict, torch.Tensor | None]]] = attrs.field(factory=dict, init=False, repr=False)
    _layers: dict[str, torch.nn.Module] = attrs.field(factory=dict, init=False, repr=False)
    _tuning: bool = attrs.field(default=False, init=False, repr=False)
    _previous: dict[str, str] = attrs.field(factory=dict, init=False, repr=False)  # layer -> the one before
    # the last tuned layer's unquantized outputs on unquantized inputs: the next layer's
    # unquantized inputs, from which its targets are computed
    _reference: tuple[str, list[torch.Tensor]] | None = attrs.field(default=None, init=False, repr=False)
    _pending: dict[torch.nn.Module, str] = attrs.field(factory=dict, init=False, repr=False)
    _round_trip: RoundTrip = attrs.field(default=int_round_trip_eager, init=False, repr=False)
    # per decoder layer, every iteration's loss and the one kept (for logs, tests, benchmarks)
    results: dict[str, TuningResult] = attrs.field(factory=dict, init=False, repr=False)
    tuning_seconds: float = attrs.field(default=0.0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        tuned = False
        for group, scheme in self.config.config_groups.items():
            if scheme.weights is not None:
                _check_scheme(scheme.weights, group)
                tuned = True
            for base, args in (("input", scheme.input_activations), ("output", scheme.output_activations)):
                if args is not None and not args.dynamic and self.iters:
                    raise ValueError(
                        f"AutoRoundModifier: config group {group!r} has static {base} activation scales; "
                        "AutoRound tunes weights (with dynamic or no activation quantization), or rounds "
                        "them to nearest beside static scales with iters=0."
                    )
        if not tuned:
            raise ValueError("AutoRoundModifier: no config group quantizes weights; AutoRound has nothing to tune.")
        if self.config.kv_cache_scheme is not None and self.iters:
            raise ValueError("AutoRoundModifier: kv_cache_scheme is calibrated by QuantizationModifier; add one after AutoRound.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    def pipeline(self) -> str:
        return "sequential" if self.iters else super().pipeline()

    def on_initialize(self, state: State) -> None:
        if _several(self.device_ids):
            logger.warning(
                "device_ids=%r: llmc tunes each layer on one device, the one the pipeline runs it on (%s).",
                self.device_ids, state.device,
            )
        elif self.device_ids is not None and _device_of(self.device_ids) != torch.device(state.device):
            raise ValueError(
                f"device_ids={self.device_ids!r} differs from the device the pipeline runs on "
                f"({state.device}): pass oneshot(device={self.device_ids!r}) instead."
            )
        super().on_initialize(state)
        if not self.iters:
            logger.info("AutoRound with iters=0: weights rounded to nearest, nothing tuned.")
            return
        self._pending = {m: n for n, m in self.targeted_modules() if m.quantization_scheme.weights is not None}
        self._round_trip = int_round_trip_eager
        if self.enable_torch_compile and torch.device(state.device).type == "cuda":
            # one fused kernel per weight and direction instead of about ten; on CPUs the
            # compilation costs more than it saves
            self._round_trip = torch.compile(int_round_trip_eager, dynamic=True)

    def on_calibration_start(self, state: State) -> None:
        if not self.iters:
            return super().on_calibration_start(state)
        from llmc_pipelines.sequential import declared_targets, sequential_targets

        for module in self._pending:
            module.quantization_enabled = False  # unquantized until tuned
        targets = state.pipeline_args.sequential_targets or declared_targets(state.stage_modifiers)
        layers = sequential_targets(state.model, targets)
        self._previous = {name: before for (before, _), (name, _) in zip(layers, layers[1:], strict=False)}
        for name, layer in layers:
            if not any(n.startswith(name + ".") for n in self._pending.values()):
                continue
            self._layers[name] = layer

            def keep(args: tuple, kwargs: dict, name: str = name) -> None:
                # the tuning's own calls are not data; by name: a finished layer's calls must
                # not stay reachable from its hook
                if not self._tuning:
                    self._captured.setdefault(name, []).append((args, kwargs, state.loss_mask))

            self.observe(state, layer, keep, call=True)

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        if not self.iters:
            return super().on_sequential_layer_end(state, layer_name, layer)
        self._tune_layer(layer_name, layer)

    def on_calibration_end(self, state: State) -> None:
        if not self.iters:
            return super().on_calibration_end(state)
        # on the basic pipeline every layer's inputs were captured in one pass
        for name, layer in list(self._layers.items()):
            self._tune_layer(name, layer)
        self._reference = None
        leftover = [(n, m) for m, n in self._pending.items()]
        if leftover:
            logger.info("AutoRound: %d modules outside the decoder layers are rounded to nearest.", len(leftover))
            self._round_to_nearest(leftover)

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        if not self.iters:
            return super().on_sequential_layer_restored(state, layer_name, layer, saved)
        self._captured.pop(layer_name, None)
        self._layers.pop(layer_name, None)
        for module in layer.modules():
            if self._pending.pop(module, None) is not None:
                self.mark_quantized_weight(module)

    # --- per layer ---------------------------------------------------------------
    def weight_qparams(
        self, weight: torch.Tensor, args: QuantizationArgs, global_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the modules AutoRound cannot tune: the range with the least rounding error
        (AutoRound's optimized round-to-nearest), or the min-max range with disable_opt_rtn."""
        if not self.disable_opt_rtn:
            args = args.model_copy(update={"observer": "memoryless_mse"})
        return weight_qparams(weight, args, global_scale)

    def _round_to_nearest(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        self.calibrate_weights(modules)
        for _, module in modules:
            self._pending.pop(module, None)
            module.quantization_enabled = True

    def _tune_layer(self, layer_name: str, layer: torch.nn.Module) -> None:
        self._layers.pop(layer_name, None)
        calls = self._captured.pop(layer_name, [])
        prefix = layer_name + "."
        modules = [(n, m) for m, n in self._pending.items() if n.startswith(prefix)]
        reference, self._reference = self._reference, None
        if not modules:
            return
        if not calls:
            logger.warning("AutoRound %s saw no calibration data; rounding it to nearest.", layer_name)
            self._round_to_nearest(modules)
            return
        started = time.perf_counter()
        self._tuning = True
        with torch.enable_grad():
            samples = LayerSamples(calls)
            count = len(samples)
            inputs = None
            if reference is not None and reference[0] == self._previous.get(layer_name) and samples.fits(reference[1]):
                inputs = reference[1]
            try:
                result, roundings, best = self._tune(layer_name, layer, modules, samples, inputs)
            finally:
                self._tuning = False
            del samples
        del calls
        with torch.no_grad():
            for (members, rounding), params in zip(roundings, best, strict=True):
                scale, zero_point = rounding.qparams(params)
                written = {
                    "weight": rounding.fake_quantize(params, straight_through=False),
                    "weight_scale": rounding.split(scale, qparams=True),
                    "weight_zero_point": rounding.split(zero_point, qparams=True),
                }
                if rounding.global_scale is not None:  # one per weight, repeated over its groups
                    written["weight_global_scale"] = [g.flatten()[:1] for g in rounding.split(rounding.global_scale, qparams=True)]
                for i, (_, module) in enumerate(members):
                    for name, values in written.items():
                        copy_into(module, name, values[i])
                    self._pending.pop(module, None)
                    self.mark_quantized_weight(module)
        seconds = time.perf_counter() - started
        self.tuning_seconds += seconds
        self.results[layer_name] = attrs.evolve(result, samples=count)
        logger.info(
            "AutoRound %s: loss %.3e at iteration 0, %.3e at iteration %d (kept), towards %s; %.2f s",
            layer_name, result.initial_loss, result.best_loss, result.best_iteration,
            "the unquantized model's outputs" if inputs is not None else "its unquantized outputs", seconds,
        )

    def _tune(
        self,
        layer_name: str,
        layer: torch.nn.Module,
        modules: list[tuple[str, torch.nn.Module]],
        samples: LayerSamples,
        unquantized_inputs: list[torch.Tensor] | None,
    ) -> tuple[TuningResult, list[tuple[list[tuple[str, torch.nn.Module]], WeightRounding]], list[RoundingParams]]:
        """Tune ``modules`` of ``layer`` on ``samples`` (its inputs through the quantized layers
        before it), towards its unquantized outputs on the unquantized model's inputs where
        they are known (every layer but the first), as AutoRound does: the rounding then also
        makes up for the error of the layers before."""

        def run(args: tuple, kwargs: dict, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            out = layer(*args, **kwargs) if weights is None else torch.func.functional_call(layer, weights, args, kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out

        with torch.no_grad():
            targets = samples.outputs(run, self.batch_size, unquantized_inputs)
            self._reference = (layer_name, targets)
            gscales = fused_global_scales(modules)
            roundings = [
                (members, WeightRounding.of(
                    [m.weight for _, m in members],
                    members[0][1].quantization_scheme.weights,
                    members[0][1].weight_scale.dtype,
                    [gscales.get(n) for n, _ in members],
                ))
                for members in _stackable(modules)
            ]
        params = [r.initial() for _, r in roundings]
        sampler = BatchSampler(len(samples), self.batch_size)

        def loss(iteration: int) -> torch.Tensor:
            weights = {}
            for (members, rounding), p in zip(roundings, params, strict=True):
                quantized = rounding.fake_quantize(p, int_round_trip=self._round_trip)
                weights.update((n[len(layer_name) + 1 :] + ".weight", w) for (n, _), w in zip(members, quantized, strict=True))
            return samples.squared_error(sampler.next(), lambda a, k: run(a, k, weights), targets)

        best, result = signed_gradient_descent(
            loss,
            [p.value for p in params],
            [t for p in params for t in (p.min_scale, p.max_scale)],
            self.iters,
            self.learning_rate,
        )
        count = len(params)
        kept = [RoundingParams(best[i], best[count + 2 * i], best[count + 2 * i + 1]) for i in range(count)]
        return result, roundings, kept
