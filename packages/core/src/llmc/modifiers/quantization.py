"""QuantizationModifier: round-to-nearest quantization over the ranges observers give."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import attrs
import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.utils import match_named_modules

from llmc import distributed
from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc.naming import by_recipe_names
from llmc.quantization.attention import apply_attention_scheme
from llmc.quantization.calibrate import (
    ActivationObservers,
    calibrate_weights,
    check_finite,
    freeze,
    initialized_modules,
)
from llmc.quantization.config import (
    accurate_match_warnings,
    apply_observer_overrides,
    as_list,
    build_config,
    check_targets_select,
    resolve_config_groups,
    scheme_needs_data,
    validate_observers,
    validate_shapes,
    warn_overlapping_groups,
    warn_unmatched,
)
from llmc.quantization.kv_cache import apply_kv_cache_scheme, attention_modules
from llmc.quantization.observers import observer_class, weight_qparams

logger = logging.getLogger(__name__)


@attrs.define(kw_only=True)
class QuantizationModifier(Modifier):
    """Quantize the weights (and optionally activations) of the targeted modules.

    ``scheme`` is a compressed-tensors preset name (W4A16, FP8_DYNAMIC, NVFP4A16,
    ...), a mapping of preset to targets, or a mapping of config groups;
    ``config_groups`` is the explicit form. Weight-only and dynamic-activation
    schemes need no data; static activation scales are observed on calibration
    data.
    """

    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list)
    ignore: list[str] = attrs.field(factory=list, converter=as_list)
    scheme: str | dict[str, Any] | None = None
    config_groups: dict[str, Any] | None = None
    # quantized keys and values (FP8 per tensor or per head): calibrated k/v scales on each
    # attention module, saved as ``self_attn.k_scale`` / ``v_scale`` as vLLM reads them
    kv_cache_scheme: dict[str, Any] | None = None
    # llm-compressor's observer overrides: a name for every group's weights / input /
    # output, or one dict {"weights"|"input"|"output": name} (see llmc.quantization.observers)
    weight_observer: str | None = None
    input_observer: str | None = None
    output_observer: str | None = None
    observer: dict[str, str] | None = None
    # llm-compressor's name: skip the check that every targeted weight splits into whole
    # groups (a weight that does not is then left to compressed-tensors to refuse)
    bypass_divisibility_checks: bool = False

    # weights quantized round-to-nearest from their own min-max range: a transform before this
    # modifier (AWQ's clipping) may narrow that range by clamping them
    weights_round_to_nearest: ClassVar[bool] = True
    # how much closer to the original model than round-to-nearest (0) a quantizer gets, for
    # `llmc demo` to pick the strongest installed one; a plugin's quantizer declares its own
    strength: ClassVar[int] = 0

    _config: QuantizationConfig | None = attrs.field(default=None, init=False, repr=False)
    _observers: ActivationObservers = attrs.field(factory=ActivationObservers, init=False, repr=False)
    _modules: list[tuple[str, Any]] = attrs.field(factory=list, init=False, repr=False)
    # modules whose weight observer weighs by input importance, by name, until their range is set
    _weighted: dict[str, Any] = attrs.field(factory=dict, init=False, repr=False)
    _importance: dict[str, tuple[torch.Tensor, int]] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # Resolve now so that a bad scheme or observer fails when the recipe is read.
        if self.scheme is None and self.config_groups is None and self.kv_cache_scheme is not None:
            groups = {}  # the KV cache alone
        else:
            groups = resolve_config_groups(self.scheme, self.config_groups, self.targets)
        apply_observer_overrides(
            groups, self.weight_observer, self.input_observer, self.output_observer, self.observer
        )
        self._config = build_config(groups, self.ignore, self.kv_cache_scheme)
        validate_observers(self._config)
        kv = self._config.kv_cache_scheme
        if kv is not None and not kv.symmetric:
            logger.warning("kv_cache_scheme is asymmetric: vLLM reads only symmetric KV-cache scales.")

    @property
    def config(self) -> QuantizationConfig:
        assert self._config is not None
        return self._config

    def needs_data(self) -> bool:
        return self.config.kv_cache_scheme is not None or any(
            scheme_needs_data(s) or _weighs_by_importance(s.weights) for s in self.config.config_groups.values()
        )

    def pipeline(self) -> str:
        """Static activation scales calibrate layer by layer, as in llm-compressor 0.14: one
        decoder layer on the device at a time, not the whole model (``basic``)."""
        return "sequential" if self.needs_data() else "datafree"

    def on_initialize(self, state: State) -> None:
        recipe_config, self._config = self.config, _by_recipe_names(state.model, self.config)
        targets = sorted({t for s in self.config.config_groups.values() for t in s.targets})
        warn_unmatched(state.model, targets, self.config.ignore)
        check_targets_select(
            state.model, targets, self.config.ignore, type(self).__name__, state.allow_unmatched_targets
        )
        warn_overlapping_groups(state.model, self.config)
        attention = self._attention_groups(state.model)
        if not self.bypass_divisibility_checks:
            validate_shapes(state.model, self.config)
        # attention states (the KV cache, queries) are llmc's to hook (llmc.quantization.kv_cache,
        # .attention), not compressed-tensors': its groups and modules are left out here
        tapped = [name for modules, _ in attention.values() for name, _ in modules]
        # a group that matches other modules too quantizes their inputs as usual
        mixed = {k for k, (modules, g) in attention.items() if len(modules) < _matches(state.model, g, self.config.ignore)}
        groups = {k: g for k, g in self.config.config_groups.items() if k not in attention or k in mixed}
        with accurate_match_warnings():
            apply_quantization_config(
                state.model,
                self.config.model_copy(update={"kv_cache_scheme": None, "config_groups": groups, "ignore": [*self.config.ignore, *tapped]}),
                show_progress=False,
            )
        _recipe_targets(state.model, self.config, recipe_config)
        if self.config.kv_cache_scheme is not None:
            apply_kv_cache_scheme(state.model, self.config.kv_cache_scheme)
        for modules, scheme in attention.values():
            apply_attention_scheme(state.model, modules, scheme)
        # Modules frozen by an earlier stage keep their parameters.
        self._modules = initialized_modules(state.model)
        check_finite(
            (f"{name}.weight", m.weight) for name, m in self._modules if m.quantization_scheme.weights is not None
        )

    def _attention_groups(
        self, model: torch.nn.Module
    ) -> dict[str, tuple[list[tuple[str, torch.nn.Module]], QuantizationScheme]]:
        """The config groups that quantize attention modules' states (no weights, input
        activations, targets matching attention modules): by group, the attention modules
        each matches and its scheme."""
        attention = dict(attention_modules(model))
        found = {}
        for key, scheme in self.config.config_groups.items():
            if scheme.weights is not None:
                continue
            modules = [(n, m) for n, m in match_named_modules(model, scheme.targets, self.config.ignore) if n in attention]
            if not modules:
                continue
            if scheme.input_activations is None or scheme.output_activations is not None:
                raise ValueError(
                    f"config group {key!r} targets attention modules ({modules[0][0]}, ...): their queries, keys "
                    "and values are quantized through input_activations alone; give input_activations and no "
                    "output_activations."
                )
            found[key] = (modules, scheme)
        return found

    # --- extension points -------------------------------------------------------
    def targeted_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of every module this modifier quantizes, in model order (known from
        :meth:`on_initialize` on; each carries its ``quantization_scheme``)."""
        return list(self._modules)

    def weight_qparams(
        self,
        weight: torch.Tensor,
        args: QuantizationArgs,
        global_scale: torch.Tensor | None,
        importance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of one weight rounded to nearest: by default the range its
        observer gives (:func:`llmc.api.weight_qparams`). Override to choose the range
        another way; called for every weight this modifier rounds to nearest, with the
        NVFP4 global scale its fused group shares (None for other schemes), and, for an
        observer that weighs by it (``imatrix_mse``), its input channels' ``importance``."""
        return weight_qparams(weight, args, global_scale, importance)

    @staticmethod
    def mark_quantized_weight(module: torch.nn.Module) -> None:
        """``module``'s weight now holds its quantized values (a modifier that solves or learns
        the rounding wrote them with its qparams): until finalize, forward passes fake-quantize
        only its activations, if its scheme has any (doing the weight again changes nothing)."""
        scheme = module.quantization_scheme
        module.quantization_enabled = bool(scheme.input_activations or scheme.output_activations)

    def calibrate_weights(
        self,
        modules: list[tuple[str, torch.nn.Module]],
        device: torch.device | None = None,
        importance: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write ``modules``' weight scales and zero points, through :meth:`weight_qparams`
        (``importance`` by module name, where measured)."""
        calibrate_weights(modules, device, self.weight_qparams, importance)

    # --- lifecycle ---------------------------------------------------------------
    # this modifier reduces its statistics over the ranks of a distributed run (llmc.distributed)
    data_parallel: ClassVar[bool] = True

    def on_calibration_start(self, state: State) -> None:
        weighted = {n for n, m in self._modules if _weighs_by_importance(m.quantization_scheme.weights)}
        self.calibrate_weights([(n, m) for n, m in self._modules if n not in weighted], state.device)
        self.measure_importance(state, [(n, m) for n, m in self._modules if n in weighted])
        self.observe_activations(state)

    def measure_importance(self, state: State, modules: list[tuple[str, torch.nn.Module]]) -> None:
        """Each module's input channels' mean square over the calibration data, for weight
        observers that weigh by it; until its layer ends (and its range is set from it) the
        module runs unquantized."""
        for name, module in modules:
            self._weighted[name] = module
            module.quantization_enabled = False

            def add(x: torch.Tensor, name: str = name) -> None:
                x = x.detach().reshape(-1, x.shape[-1]).float()
                total, count = self._importance.get(name, (None, 0))
                squares = x.pow(2).sum(dim=0)
                self._importance[name] = (squares if total is None else total + squares, count + x.shape[0])

            self.observe(state, module, add)

    def calibrate_by_importance(self, names: list[str], device: torch.device | None = None) -> None:
        """Set the ranges of the modules :meth:`measure_importance` measured (``names``), from
        their importance (summed over the ranks of a distributed run)."""
        modules = [(name, self._weighted.pop(name)) for name in names]
        importance = {}
        for name, module in modules:
            total, count = self._importance.pop(name, (None, 0))
            if distributed.is_distributed():  # collective: the same modules in the same order everywhere
                total = distributed.all_reduce(torch.zeros(module.weight.shape[1], device=module.weight.device)
                                               if total is None else total)
                count = int(distributed.all_reduce(torch.tensor([float(count)], device=total.device)).item())
            if count:
                importance[name] = total / count
            else:
                logger.warning("%s saw no calibration data: its weight range weighs every input channel alike.", name)
        self.calibrate_weights(modules, device, importance)
        for _, module in modules:
            module.quantization_enabled = True

    def observe_activations(self, state: State) -> None:
        """Static activation scales of every targeted module, observed while calibrating
        (under a distributed run, kept to be synchronized at each layer's end)."""
        self._observers.batch_index = (lambda: state.batch_index) if distributed.is_distributed() else None
        for name, module in self._modules:
            self._observers.attach(module, lambda: state.observing, name)

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        self._observers.synchronize(layer_name + ".")
        self.calibrate_by_importance([n for n in self._weighted if n.startswith(layer_name + ".")], state.device)

    def on_calibration_end(self, state: State) -> None:
        self.calibrate_by_importance(list(self._weighted), state.device)
        self._observers.detach()

    def on_finalize(self, state: State) -> None:
        for _, module in self._modules:  # a subclass may have switched quantization off meanwhile
            module.quantization_enabled = True
        freeze(self._modules)

    def sequential_layer_state(self, state: State, layer_name: str) -> dict[str, torch.Tensor]:
        return self._observers.ranges(layer_name + ".")

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        self._observers.restore(saved, state.device)
        for name in [n for n in self._weighted if n.startswith(layer_name + ".")]:  # ranges restored with the layer
            self._weighted.pop(name).quantization_enabled = True
            self._importance.pop(name, None)


def _by_recipe_names(model: torch.nn.Module, config: QuantizationConfig) -> QuantizationConfig:
    """``config`` with the modules that its targets or ignore name only by their recipe names
    (:mod:`llmc.naming`) added by their real names."""
    ignored = by_recipe_names(model, config.ignore)
    ignore = [*config.ignore, *ignored]
    groups = {}
    for key, scheme in config.config_groups.items():
        added = by_recipe_names(model, scheme.targets, ignore)
        groups[key] = scheme.model_copy(update={"targets": [*scheme.targets, *added]}) if added else scheme
    if not ignored and all(groups[k] is config.config_groups[k] for k in groups):
        return config
    return config.model_copy(update={"config_groups": groups, "ignore": ignore})


def _recipe_targets(model: torch.nn.Module, applied: QuantizationConfig, recipe: QuantizationConfig) -> None:
    """Give back each module's scheme the recipe's targets where the applied ones add modules by
    name (:func:`_by_recipe_names`): the saved config lists the recipe's patterns, not every expert."""
    restored = {
        tuple(scheme.targets): recipe.config_groups[key].targets
        for key, scheme in applied.config_groups.items()
        if scheme.targets != recipe.config_groups[key].targets
    }
    if not restored:
        return
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and tuple(scheme.targets) in restored:
            module.quantization_scheme = scheme.model_copy(update={"targets": restored[tuple(scheme.targets)]})


def _matches(model: torch.nn.Module, scheme: QuantizationScheme, ignore: list[str]) -> int:
    return sum(1 for _ in match_named_modules(model, scheme.targets, ignore))


def _weighs_by_importance(args: QuantizationArgs | None) -> bool:
    """Whether a weight's observer weighs its error by the input channels' importance."""
    return args is not None and observer_class(args, "weight").uses_importance


def __getattr__(name: str) -> Any:
    """llm-compressor's import path: ``from llmcompressor.modifiers.quantization import
    GPTQModifier`` works there, so other modifiers resolve here through the registry too."""
    from llmc.modifiers import __getattr__ as resolve

    return resolve(name)
