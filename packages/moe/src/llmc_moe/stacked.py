"""Every expert of a layer on every token in a few batched matmuls, hooks and quantization kept.

Called one by one, a hundred experts launch a dozen kernels each per batch for a few
microseconds of work: the layer's time is their launch count. When all experts see
the same tokens (all-experts calibration), their gate and up projections are one
matmul and their down projections one batched matmul. What each ``Linear``'s own call
would do is done for it, in its order: its forward pre-hooks with its input, the fake
quantization compressed-tensors applies in its forward (input, weight, output, from the
module's own parameters, through compressed-tensors' ``forward_quantize``), and its
forward hooks with its output. A module whose forward was replaced by anything else
makes the layer fall back to calling each expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def stackable(module: nn.Module) -> bool:
    """Whether the module's call is ``F.linear`` around its hooks, or compressed-tensors'
    quantized forward (which :func:`quantized` reproduces)."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return True
    from compressed_tensors.quantization.lifecycle import forward as quantized_forward

    code = getattr(getattr(forward, "__func__", None), "__code__", None)
    return code is not None and code.co_filename == quantized_forward.__file__


def _quantization(module: nn.Module) -> tuple[Any, bool]:
    scheme = getattr(module, "quantization_scheme", None)
    enabled = (
        getattr(module, "quantization_enabled", True)
        and scheme is not None
        and getattr(module, "quantization_status", None) is not None
        and "forward" in module.__dict__
    )
    return scheme, enabled


def quantized(module: nn.Module, value: torch.Tensor, base: str) -> torch.Tensor:
    """``value`` as the module's quantized forward sees it (``base``: input, weight, output)."""
    scheme, enabled = _quantization(module)
    if not enabled:
        return value
    args = getattr(scheme, {"input": "input_activations", "weight": "weights", "output": "output_activations"}[base])
    if args is None:
        return value
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    if base == "weight" and module.quantization_status >= QuantizationStatus.COMPRESSED:
        return value
    return forward_quantize(module, value, base, args)


def quantizes_input(module: nn.Module) -> bool:
    scheme, enabled = _quantization(module)
    return enabled and scheme.input_activations is not None


_INPUT_QPARAMS = ("input_scale", "input_zero_point", "input_global_scale")


def same_input_quantization(modules: Sequence[nn.Module]) -> bool:
    """Whether every module quantizes its input exactly as the first does (same arguments and
    equal scales): fed one tensor, they all see one quantized tensor. All experts calibrated on
    every token observe the same ranges, so their gate and up projections qualify, and one
    quantization replaces hundreds (one host sync to compare the scales)."""
    first = modules[0]
    args = first.quantization_scheme.input_activations
    names = [n for n in _INPUT_QPARAMS if getattr(first, n, None) is not None]
    if any(m.quantization_scheme.input_activations != args for m in modules[1:]):
        return False
    for name in names:
        values = [getattr(m, name, None) for m in modules]
        if any(v is None or v.shape != values[0].shape for v in values):
            return False
    if not names:
        return True
    stacked = torch.stack([torch.cat([getattr(m, n).reshape(-1).float() for n in names]) for m in modules])
    return bool((stacked == stacked[:1]).all())


def quantized_inputs(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x[i]`` as module ``i``'s quantized forward sees it, for a (modules, tokens, in) ``x``,
    in one call: compressed-tensors' own arithmetic (``forward_quantize``'s steps) with every
    module's input scales stacked along the first dimension, where they broadcast like a batch
    dimension of activations. Modules with different input arguments go one by one."""
    first = modules[0]
    args = first.quantization_scheme.input_activations
    names = [n for n in _INPUT_QPARAMS if getattr(first, n, None) is not None]
    uniform = all(
        m.quantization_scheme.input_activations == args
        and all(getattr(m, n, None) is not None and getattr(m, n).numel() == 1 for n in names)
        for m in modules
    )
    from compressed_tensors.quantization import DynamicType, QuantizationStrategy

    dynamic = args.dynamic in (True, DynamicType.LOCAL)
    grouped = args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
    # a dynamic per-tensor or per-token range would span every module's rows (compressed-tensors
    # takes a 2-D input's per-token range over the whole tensor): those go one by one
    if not uniform or x.numel() == 0 or (dynamic and not grouped):
        return torch.stack([quantized(m, x[i], "input") for i, m in enumerate(modules)])
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    def stack(name: str, ndim: int) -> torch.Tensor | None:
        if name not in names:
            return None
        return torch.stack([getattr(m, name).reshape(()) for m in modules]).view(-1, *([1] * (ndim - 1)))

    global_scale = stack("input_global_scale", x.ndim)
    if dynamic:
        scale, zero_point = compute_dynamic_scales_and_zp(x, args, first, global_scale=global_scale)
    else:
        scale, zero_point = stack("input_scale", x.ndim), stack("input_zero_point", x.ndim)
    if global_scale is not None and grouped:
        global_scale = global_scale.unsqueeze(-1)  # the group dimension the scales gain there
    return fake_quantize(x=x, scale=scale, zero_point=zero_point, args=args, global_scale=global_scale)


def quantizes_output(module: nn.Module) -> bool:
    scheme, enabled = _quantization(module)
    return enabled and scheme.output_activations is not None


def pre_hooks(module: nn.Module, args: tuple) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        result = hook(module, args, {}) if key in module._forward_pre_hooks_with_kwargs else hook(module, args)
        if result is not None:
            raise RuntimeError(
                f"A forward pre-hook on an expert projection ({hook!r}) replaced its input; "
                "stacked expert calibration cannot honour that. Return None from the hook."
            )


def post_hooks(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    for key, hook in list(module._forward_hooks.items()):
        if key in module._forward_hooks_with_kwargs:
            result = hook(module, args, {}, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            raise RuntimeError(
                f"A forward hook on an expert projection ({hook!r}) replaced its output; "
                "stacked expert calibration cannot honour that. Return None from the hook."
            )


def _signature(modules: Sequence[nn.Module]) -> tuple:
    """What the stacked (fake-quantized) weights of ``modules`` depend on: every parameter's
    memory and version. An in-place edit bumps the version when made through the parameter or
    ``detach()`` (a solve, a search): one through ``.data`` does not, and would leave the stacks
    stale (AWQ's search once measured every candidate of a norm's experts as unchanged)."""
    return tuple(
        (p.data_ptr(), p._version) for m in modules for p in m._parameters.values() if p is not None
    )


class WeightStacks:
    """The stacked weights (as each module's forward would use them) of one layer's experts,
    kept while nothing they depend on changes: a pass over the calibration batches stacks
    and fake-quantizes them once, not once per batch. One store serves every experts module
    of a model and holds one module's stacks at a time (the basic pipeline runs every layer
    per batch: each evicts the last), so at most one layer's copy is on the device; the plugin
    also clears it at every layer end and at calibration end."""

    def __init__(self) -> None:
        self._owner: int | None = None
        self._stacks: dict[tuple[int, str], tuple[tuple, torch.Tensor]] = {}

    def get(self, owner: nn.Module, key: tuple[int, str], modules: Sequence[nn.Linear]) -> torch.Tensor:
        if torch.is_grad_enabled() and any(m.weight.requires_grad for m in modules):
            # weights a caller differentiates through (AutoRound's, new every step): never kept,
            # a fresh tensor may reuse a freed one's memory and version
            return torch.stack([quantized(m, m.weight, "weight") for m in modules])
        if self._owner != id(owner):
            self._stacks.clear()
            self._owner = id(owner)
        signature = _signature(modules)
        found = self._stacks.get(key)
        if found is not None and found[0] == signature:
            return found[1]
        stacked = torch.stack([quantized(m, m.weight, "weight") for m in modules])
        self._stacks[key] = (signature, stacked)
        return stacked

    def clear(self) -> None:
        self._stacks.clear()
        self._owner = None


def bias(modules: Sequence[nn.Linear]) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.stack(
        [b if b is not None else m.weight.new_zeros(m.out_features) for m, b in zip(modules, biases, strict=True)]
    )


def project(
    x: torch.Tensor | list[torch.Tensor], weights: torch.Tensor, biases: torch.Tensor | None, shared: bool
) -> torch.Tensor:
    """(modules, tokens, out): one ``shared`` input through every module's weight in one matmul,
    or one input per module (a (modules, tokens, in) tensor or a list) in one batched matmul."""
    if shared:
        assert isinstance(x, torch.Tensor)
        out = F.linear(x, weights.flatten(0, 1)).unflatten(-1, (weights.shape[0], -1)).transpose(0, 1)
    else:
        out = torch.bmm(x if isinstance(x, torch.Tensor) else torch.stack(x), weights.transpose(1, 2))
    return out if biases is None else out + biases[:, None, :]
