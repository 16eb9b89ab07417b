"""Set quantization parameters on modules that compressed-tensors has initialized."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import torch
from compressed_tensors.quantization import QuantizationStatus, QuantizationStrategy
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from llmc.quantization.observers import MinMaxObserver, global_scale, weight_qparams

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


class ActivationObservers:
    """Forward hooks that keep static activation scales current during calibration.

    The running min/max is written into the module's qparams after every batch
    so that quantization-aware forward passes use the estimate so far.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, module: torch.nn.Module, observing: Callable[[], bool] = lambda: True) -> None:
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

            def record(mod: torch.nn.Module, value: torch.Tensor, base=base, args=args, observer=observer) -> None:
                if not observing():
                    return
                observer.update(value)
                if args.strategy == QuantizationStrategy.TENSOR_GROUP:
                    _copy(mod, f"{base}_global_scale", generate_gparam(observer.min, observer.max))
                else:
                    scale, zp = calculate_qparams(observer.min.reshape(1), observer.max.reshape(1), args)
                    _copy(mod, f"{base}_scale", scale)
                    _copy(mod, f"{base}_zero_point", zp)

            if base == "input":
                handle = module.register_forward_pre_hook(lambda m, a, record=record: record(m, a[0]))
            else:
                handle = module.register_forward_hook(lambda m, a, out, record=record: record(m, out))
            self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def freeze(modules: Iterable[tuple[str, torch.nn.Module]]) -> None:
    for _, module in modules:
        module.quantization_status = QuantizationStatus.FROZEN
