"""AWQModifier: activation-aware scales searched per mapping, then round-to-nearest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.utils import is_match
from tqdm.auto import tqdm

from llmc import distributed
from llmc.lifecycle import State
from llmc.linalg import add_gram, mirror_upper
from llmc.mappings import ResolvedMapping, balance_input_source, fold_scales, resolve_mappings
from llmc.modifiers.quantization import QuantizationModifier
from llmc.tensors import map_tensors
from llmc_awq.clip import GroupMoments, clip_group_size, clip_weight
from llmc_awq.grouping import checked_groups, grouped_calls, plan_groups
from llmc_awq.search import GramError, OutputError, search_scales

logger = logging.getLogger(__name__)


def _move(value: Any, device: torch.device | str | None) -> Any:
    return value if device is None else map_tensors(value, lambda t: t.to(device))


def masked_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (..., features) as rows of tokens, only those ``mask`` (use_loss_mask) keeps; all
    of them without a mask, or where ``x`` is not laid out by the batch's tokens (an MoE
    expert's routed tokens)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None or tuple(x.shape[:-1]) != tuple(mask.shape):
        return rows
    return rows[mask.reshape(-1).to(x.device) == 1]


def _group_in_place(cached: list, groups: list) -> None:
    """Replace ``cached`` by one call per group (concatenated once, where the cache is, not for
    every candidate), releasing each group's members as it goes: never two copies of it."""
    grouped = []
    for group in groups:
        (call,) = grouped_calls(cached, [group], lambda value: value)
        grouped.append(call)
        for i in group.indices:
            cached[i] = None
    cached[:] = grouped


def _parent_name(names: tuple[str, ...]) -> str:
    """The deepest module that holds every balance layer (the layer itself when there is one)."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


WeightArgs = Callable[[str, torch.nn.Module], QuantizationArgs | None]


def applied_weight_args(name: str, module: torch.nn.Module) -> QuantizationArgs | None:
    """The weight arguments compressed-tensors attached to ``module`` (all-in-one AWQ)."""
    scheme = getattr(module, "quantization_scheme", None)
    return scheme.weights if scheme is not None else None


def config_weight_args(config: QuantizationConfig) -> WeightArgs:
    """The weight arguments ``config`` will give a module (AWQ as a transform: the quantizing
    modifier after it applies them), first matching group first, as compressed-tensors does."""

    def args(name: str, module: torch.nn.Module) -> QuantizationArgs | None:
        if is_match(name, module, config.ignore or []):
            return None
        for scheme in config.config_groups.values():
            if is_match(name, module, scheme.targets):
                return scheme.weights
        return None

    return args


def _usable(mapping: ResolvedMapping, weight_args: WeightArgs) -> bool:
    """A mapping AWQ can scale: a quantized balance layer, and every balance layer's inputs the
    smooth outputs. Balance layers left unquantized (an MoE router) are scaled with the others,
    so the function is unchanged, but take no part in the search."""
    name, channels = mapping.smooth_name, mapping.smooth.weight.shape[0]
    if not any(weight_args(n, b) for n, b in zip(mapping.balance_names, mapping.balance, strict=True)):
        logger.info("AWQ %s: no balance layer is quantized; skipped.", name)
        return False
    if any(b.weight.shape[1] != channels for b in mapping.balance):
        logger.info("AWQ %s: balance layers' inputs do not match its %d outputs; skipped.", name, channels)
        return False
    return True


def _gram_parent(mapping: ResolvedMapping, parent: torch.nn.Module) -> bool:
    """A parent that is a Linear layer balanced alone: its output error follows from the Gram
    matrix of its inputs (llmc_awq.search.GramError), nothing to cache or re-run."""
    return isinstance(parent, torch.nn.Linear) and len(mapping.balance) == 1 and mapping.balance[0] is parent


def _next_quantizing(modifier: Any, stage: Any) -> Any | None:
    """The first modifier after ``modifier`` in its stage that applies a quantization config."""
    modifiers = list(stage)
    if modifier not in modifiers:
        return None
    for other in modifiers[modifiers.index(modifier) + 1 :]:
        if getattr(other, "config", None) is not None and getattr(other.config, "config_groups", None):
            return other
    return None


@attrs.define(kw_only=True)
class AWQModifier(QuantizationModifier):
    """AWQ: for each mapping, grid-search per-channel scales s = x̄^r / w̄^(1-r) that minimise
    the parent module's output error with quantized balance layers; fold the best into the
    smooth layer; then quantize round-to-nearest. Runs layer by layer (sequential pipeline).

    Without ``scheme`` or ``config_groups`` and followed in its stage by a quantizing modifier
    (llm-compressor 0.14's shape: ``AWQModifier`` then ``QuantizationModifier`` or
    ``GPTQModifier``), AWQ only scales, searching with that modifier's targets, ignore and
    scheme, which then quantizes. Alone, without a scheme, it quantizes W4A16_ASYM itself.
    """

    strength: ClassVar[int] = 1  # for `llmc demo`: after GPTQ, before round-to-nearest
    mappings: list[Any] | None = None
    duo_scaling: bool | str = attrs.field(default=True, validator=attrs.validators.in_([True, False, "both"]))
    n_grid: int = attrs.field(default=20, validator=attrs.validators.gt(0))
    offload_device: str | None = None
    # the original AWQ's weight clipping (AutoAWQ's apply_clip), which llm-compressor lacks:
    # each group's range shrunk to the output-error minimum after scaling (llmc_awq.clip).
    # "auto": when the weights are then rounded to nearest (by AWQ itself or the next
    # modifier), not before a modifier that solves for them (GPTQ wants them unclipped)
    apply_clip: bool | str = attrs.field(default="auto", validator=attrs.validators.in_([True, False, "auto"]))

    _resolved: list[ResolvedMapping] = attrs.field(factory=list, init=False, repr=False)
    _inputs: dict[str, list[tuple[tuple, dict, torch.Tensor | None]]] = attrs.field(factory=dict, init=False, repr=False)
    # parents that are Linear layers balanced alone: the Gram matrix of their inputs (None
    # until a token reaches them) and its token count instead of cached inputs (GramError)
    _grams: dict[str, tuple[torch.Tensor | None, int]] = attrs.field(factory=dict, init=False, repr=False)
    _x_sum: dict[str, torch.Tensor] = attrs.field(factory=dict, init=False, repr=False)
    _x_count: dict[str, int] = attrs.field(factory=dict, init=False, repr=False)
    _moments: dict[str, GroupMoments] = attrs.field(factory=dict, init=False, repr=False)
    _clipping: bool = attrs.field(default=False, init=False, repr=False)
    _done: set[str] = attrs.field(factory=set, init=False, repr=False)
    _modules_by_name: dict[str, torch.nn.Module] = attrs.field(factory=dict, init=False, repr=False)
    _searching: bool = attrs.field(default=False, init=False, repr=False)
    _weight_args: WeightArgs = attrs.field(default=applied_weight_args, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # without scheme or config_groups the quantization comes from the stage (on_initialize)
        if self.scheme is not None or self.config_groups is not None:
            super().__attrs_post_init__()

    @property
    def config(self) -> QuantizationConfig | None:  # type: ignore[override]
        """The config this AWQ applies itself; None while it is a transform (or undecided)."""
        return self._config

    def pipeline(self) -> str:
        return "sequential"

    def on_initialize(self, state: State) -> None:
        after = _next_quantizing(self, state.stage_modifiers) if self._config is None else None
        if after is not None:
            # llm-compressor's shape: AWQ only scales; the next modifier quantizes with its own
            # targets, ignore and scheme, which the search uses too
            config = after.config
            logger.info("AWQ scales for %s's quantization (%s).", type(after).__name__, ", ".join(config.config_groups))
            self._weight_args = config_weight_args(config)
            ignore = list(config.ignore or [])
        else:
            if self._config is None:  # the all-in-one form with its default scheme
                self.scheme = "W4A16_ASYM"
                super().__attrs_post_init__()
            super().on_initialize(state)
            self._weight_args = applied_weight_args
            ignore = self.ignore
        rounded = after is None or getattr(after, "weights_round_to_nearest", False)
        self._clipping = self.apply_clip is True or (self.apply_clip == "auto" and rounded)
        resolved = resolve_mappings(state.model, self.mappings, "awq", ignore)
        self._resolved = [m for m in resolved if _usable(m, self._weight_args)]  # no hooks or caches for the rest

    def on_calibration_start(self, state: State) -> None:
        modules = dict(state.model.named_modules())
        for _, module in self.targeted_modules():
            module.quantization_enabled = False  # scales are searched on unquantized activations
        for mapping in self._resolved:
            parent = _parent_name(mapping.balance_names)
            if _gram_parent(mapping, modules[parent]):
                if parent not in self._grams:
                    self._grams[parent] = (None, 0)

                    def gram(args: tuple, kwargs: dict, parent: str = parent) -> None:
                        if not self._searching:
                            rows = masked_tokens(args[0].detach(), state.loss_mask)
                            total, tokens = self._grams[parent]
                            if total is None:
                                total = torch.zeros(rows.shape[-1], rows.shape[-1], device=rows.device)
                            self._grams[parent] = (add_gram(total, rows), tokens + rows.shape[0])

                    self.observe(state, modules[parent], gram, call=True)
            elif parent not in self._inputs:
                self._inputs[parent] = []

                def keep(args: tuple, kwargs: dict, parent: str = parent) -> None:
                    if not self._searching:  # the search's own passes are not data
                        self._inputs[parent].append(_move((args, kwargs, state.loss_mask), self.offload_device))

                self.observe(state, modules[parent], keep, call=True)
            name = mapping.smooth_name
            moments = self._clip_moments(mapping)
            if moments is not None:
                self._moments[name] = moments

            def mean(x: torch.Tensor, name: str = name, moments: GroupMoments | None = moments) -> None:
                if not self._searching:
                    x = masked_tokens(x.detach(), state.loss_mask)
                    total = x.abs().float().sum(dim=0)
                    self._x_sum[name] = self._x_sum[name] + total if name in self._x_sum else total
                    self._x_count[name] = self._x_count.get(name, 0) + x.shape[0]
                    if moments is not None:
                        moments.add(x)

            module, output = balance_input_source(mapping)
            self.observe(state, module, mean, output=output)
        self._modules_by_name = modules

    def _clip_moments(self, mapping: ResolvedMapping) -> GroupMoments | None:
        """Second moments of the mapping's input, by the first clipped balance layer's groups."""
        if not self._clipping:
            return None
        for name, layer in zip(mapping.balance_names, mapping.balance, strict=True):
            args = self._weight_args(name, layer)
            if args is not None:
                size = clip_group_size(args, layer.weight.shape[1])
                return GroupMoments(size) if size else None
        return None

    def _clip(self, mapping: ResolvedMapping, scales: torch.Tensor) -> None:
        moments = self._moments.pop(mapping.smooth_name, None)
        if moments is None or moments.blocks is None:
            return
        blocks = moments.scaled(scales)
        for name, layer in zip(mapping.balance_names, mapping.balance, strict=True):
            args = self._weight_args(name, layer)
            if args is None:
                continue
            if clip_group_size(args, layer.weight.shape[1]) != moments.group_size:
                continue
            with torch.no_grad():
                ratio = clip_weight(layer.weight, blocks, args)
            logger.debug("AWQ clip %s: mean range kept %.3f", name, float(ratio.mean()))

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        super().on_sequential_layer_end(state, layer_name, layer)
        prefix = layer_name + "."
        self._process([m for m in self._resolved if m.smooth_name.startswith(prefix)])
        self._quantize([(n, m) for n, m in self.targeted_modules() if n.startswith(prefix)])

    def on_calibration_end(self, state: State) -> None:
        self._process(list(self._resolved))
        self._quantize(self.targeted_modules())
        self._inputs.clear()

    def _quantize(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        todo = [(n, m) for n, m in modules if n not in self._done]
        self.calibrate_weights(todo)
        for name, module in todo:
            self._done.add(name)
            module.quantization_enabled = True

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        prefix = layer_name + "."
        self._process([m for m in self._resolved if m.smooth_name.startswith(prefix)], apply=False)
        for name, module in self.targeted_modules():
            if name.startswith(prefix):
                self._done.add(name)
                module.quantization_enabled = True

    def _process(self, mappings: list[ResolvedMapping], apply: bool = True) -> None:
        """Scale (and clip) for ``mappings``, or only forget their statistics (``apply=False``:
        a resumed run restored their layer)."""
        if apply:
            self._synchronize(mappings)
        # a layer's searches take minutes on a CPU: say where they are
        shown = tqdm(mappings, desc="AWQ scale search", unit="mapping", leave=False, disable=not apply or len(mappings) < 2)
        for mapping in shown:
            self._resolved.remove(mapping)
            if apply:
                shown.set_postfix_str(mapping.smooth_name, refresh=False)
                self._apply(mapping)
            else:
                for statistics in (self._x_sum, self._x_count, self._moments):
                    statistics.pop(mapping.smooth_name, None)
            parent = _parent_name(mapping.balance_names)
            if not any(_parent_name(m.balance_names) == parent for m in self._resolved):
                # the later mappings' searches have this parent's memory
                self._inputs.pop(parent, None)
                self._grams.pop(parent, None)

    def _synchronize(self, mappings: list[ResolvedMapping]) -> None:
        """Sum the ranks' input statistics of ``mappings`` (a distributed run: collective, the
        same mappings in the same order on every rank; a rank that saw none adds zeros)."""
        if not distributed.is_distributed():
            return
        for mapping in mappings:
            name, weight = mapping.smooth_name, mapping.balance[0].weight
            total = self._x_sum.get(name)
            total = distributed.all_reduce(torch.zeros(weight.shape[1], device=weight.device) if total is None else total)
            count = int(distributed.all_reduce(torch.tensor([float(self._x_count.get(name, 0))], dtype=torch.float64)).item())
            if count:
                self._x_sum[name], self._x_count[name] = total, count
            moments = self._moments.get(name)
            if moments is not None:  # every rank made one: it depends on the scheme alone
                if moments.blocks is None:
                    size = moments.group_size
                    moments.blocks = torch.zeros(weight.shape[1] // size, size, size, device=weight.device)
                distributed.all_reduce(moments.blocks)

    def _apply(self, mapping: ResolvedMapping) -> None:
        name = mapping.smooth_name
        count = self._x_count.pop(name, 0)
        if not count:
            logger.warning("AWQ %s saw no calibration data; left unscaled.", name)
            self._moments.pop(name, None)
            return
        x_mean = self._x_sum.pop(name) / count
        parent_name = _parent_name(mapping.balance_names)
        parent = self._modules_by_name[parent_name]
        cached = self._inputs.get(parent_name, [])
        device = mapping.balance[0].weight.device

        def move(value: Any) -> Any:
            return _move(value, device)

        def run(args: tuple, kwargs: dict, mask: torch.Tensor | None) -> torch.Tensor:
            out = parent(*args, **kwargs)
            return masked_tokens(out[0] if isinstance(out, tuple) else out, mask)

        self._searching = True  # the search's own forward passes are not calibration data
        try:
            if parent_name in self._grams:
                total, tokens = self._grams[parent_name]
                if total is None:  # no token reached it here
                    total = torch.zeros(parent.weight.shape[1], parent.weight.shape[1], device=device)
                measure: OutputError | GramError = GramError(parent, mirror_upper(total), tokens)
            else:
                with torch.no_grad():  # several cached batches per parent call, where the parent allows it
                    groups = checked_groups(cached, plan_groups(cached), move, run)
                    _group_in_place(cached, groups)

                def run_call(i: int) -> torch.Tensor:
                    with torch.no_grad():
                        return run(*move(cached[i]))

                with torch.no_grad():
                    measure = OutputError(run_call, len(cached))

            quantized = [(b, self._weight_args(n, b)) for n, b in zip(mapping.balance_names, mapping.balance, strict=True)]
            quantized = [(b, a) for b, a in quantized if a is not None]
            result = search_scales(
                measure,
                [b for b, _ in quantized],
                x_mean,
                quantized[0][1],
                self.n_grid,
                self.duo_scaling,
                reduce=distributed.all_reduce,
            )
        finally:
            self._searching = False
        del measure
        fold_scales(mapping, result.scales)
        self._clip(mapping, result.scales)
        logger.info(
            "AWQ %s: output error %.3e (round-to-nearest %.3e)", name, result.loss, result.rtn_loss
        )
