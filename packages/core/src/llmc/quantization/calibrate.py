"""Set quantization parameters on modules that compressed-tensors has initialized."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStatus,
    QuantizationStrategy,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from llmc.quantization.observers import MinMaxObserver, global_scale, weight_qparams

logger = logging.getLogger(__name__)

# Layers that inference engines fuse into one matmul must share a global scale.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


def fused_group_key(module_name: str) -> tuple[str, tuple[str, ...]] | None:
    """(parent, group) for a module that shares a fused matmul with its siblings, else None."""
    parent, _, leaf = module_name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return parent, group
    return None


def quantized_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if getattr(m, "quantization_scheme", None) is not None
    ]


def initialized_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules given a scheme by the config just applied and not yet frozen."""
    return [
        (name, m)
        for name, m in quantized_modules(model)
        if getattr(m, "quantization_status", None) == QuantizationStatus.INITIALIZED
    ]


def _copy(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    param = getattr(module, name, None)
    if param is not None:
        param.data.copy_(value.reshape(param.shape).to(param.dtype))


def fused_global_scales(
    modules: Iterable[tuple[str, torch.nn.Module]], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Per-module weight global scales, the minimum over each fused group."""
    scales: dict[str, torch.Tensor] = {}
    for name, module in modules:
        args = module.quantization_scheme.weights
        if args is not None and args.strategy == QuantizationStrategy.TENSOR_GROUP:
            weight = module.weight if device is None else module.weight.to(device)
            scales[name] = global_scale(weight, args)
    by_group: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for name in scales:
        key = fused_group_key(name)
        if key is not None:
            by_group[key].append(name)
    for members in by_group.values():
        shared = torch.stack([scales[m] for m in members]).min(dim=0).values
        for m in members:
            scales[m] = shared
    return scales


def calibrate_weight(
    module: torch.nn.Module,
    gscale: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> None:
    """Round-to-nearest min-max scale and zero point for the module's weight."""
    args = module.quantization_scheme.weights
    if args is None:
        return
    weight = module.weight if device is None else module.weight.to(device)
    if gscale is not None:
        _copy(module, "weight_global_scale", gscale)
    scale, zero_point = weight_qparams(weight, args, gscale)
    _copy(module, "weight_scale", scale)
    _copy(module, "weight_zero_point", zero_point)


def calibrate_weights(
    modules: list[tuple[str, torch.nn.Module]], device: torch.device | None = None
) -> None:
    gscales = fused_global_scales(modules, device)
    for name, module in modules:
        calibrate_weight(module, gscales.get(name), device)


@contextlib.contextmanager
def quantization_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run forward passes without fake quantization (calibration that is not quantization-aware)."""
    modules = [m for _, m in quantized_modules(model)]
    previous = [getattr(m, "quantization_enabled", True) for m in modules]
    for m in modules:
        m.quantization_enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(modules, previous, strict=True):
            m.quantization_enabled = enabled


def _write_activation_qparams(
    module: torch.nn.Module, base: str, args: QuantizationArgs, lo: torch.Tensor, hi: torch.Tensor
) -> None:
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        _copy(module, f"{base}_global_scale", generate_gparam(lo, hi))
    else:
        scale, zp = calculate_qparams(lo.reshape(1), hi.reshape(1), args)
        _copy(module, f"{base}_scale", scale)
        _copy(module, f"{base}_zero_point", zp)


def sibling_key(name: str) -> str:
    """``model.layers.3.mlp.experts.17.up_proj`` -> ``model.layers.*.mlp.experts.*.up_proj``:
    the modules that play one role in a stack of layers or experts."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


class ActivationObservers:
    """Forward hooks that keep static activation scales current during calibration.

    The running min/max is written into the module's qparams after every batch
    so that quantization-aware forward passes use the estimate so far. A module
    that saw no data at all (an MoE expert no token was routed to) gets, on
    :meth:`detach`, the range its siblings saw (the same role in the other
    experts or layers), never the uninitialised values compressed-tensors left.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._observed: list[tuple[str, torch.nn.Module, str, QuantizationArgs, MinMaxObserver]] = []
        self._last_value: torch.Tensor | None = None
        self._last_version = 0
        self._last_range: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(
        self,
        module: torch.nn.Module,
        observing: Callable[[], bool] = lambda: True,
        name: str | None = None,
    ) -> None:
        scheme = module.quantization_scheme
        for base, args in (("input", scheme.input_activations), ("output", scheme.output_activations)):
            if args is None or args.dynamic is True:
                continue
            if args.strategy not in (QuantizationStrategy.TENSOR, QuantizationStrategy.TENSOR_GROUP):
                raise ValueError(
                    f"Static {base} activation quantization with strategy {args.strategy!r} is "
                    "not supported; use 'tensor', 'tensor_group', or dynamic activations."
                )
            observer = MinMaxObserver()
            self._observed.append((name or f"<module {id(module)}>", module, base, args, observer))

            def record(mod: torch.nn.Module, value: torch.Tensor, base=base, args=args, observer=observer) -> None:
                if not observing():
                    return
                observer.update_range(*self._range(value))
                _write_activation_qparams(mod, base, args, observer.min, observer.max)

            if base == "input":
                handle = module.register_forward_pre_hook(lambda m, a, record=record: record(m, a[0]))
            else:
                handle = module.register_forward_hook(lambda m, a, out, record=record: record(m, out))
            self._handles.append(handle)

    def _range(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of ``value``, computed once for modules fed the very same tensor in a
        row (q/k/v, gate/up, every expert when all see every token)."""
        if value is not self._last_value or value._version != self._last_version:
            self._last_value, self._last_version = value, value._version
            self._last_range = torch.aminmax(value.detach().float())
        return self._last_range

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_value = None
        self._fill_unobserved()
        self._observed.clear()

    def _fill_unobserved(self) -> None:
        unseen = [entry for entry in self._observed if not entry[4].seen]
        if not unseen:
            return
        ranges: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for name, _, base, _, observer in self._observed:
            if observer.seen:
                key = (sibling_key(name), base)
                lo, hi = ranges.get(key, (observer.min, observer.max))
                ranges[key] = (torch.minimum(lo, observer.min), torch.maximum(hi, observer.max))
        for name, module, base, args, _ in unseen:
            found = ranges.get((sibling_key(name), base))
            if found is None:
                logger.warning(
                    "%s saw no calibration data and no module in its role did: its static %s "
                    "scale is set for the range [-1, 1].", name, base
                )
                found = (torch.tensor(-1.0), torch.tensor(1.0))
            else:
                logger.warning(
                    "%s saw no calibration data: its static %s scale takes the range its "
                    "siblings (%s) saw.", name, base, sibling_key(name)
                )
            _write_activation_qparams(module, base, args, *found)  # _copy moves it to the parameter


def freeze(modules: Iterable[tuple[str, torch.nn.Module]]) -> None:
    for _, module in modules:
        module.quantization_status = QuantizationStatus.FROZEN
