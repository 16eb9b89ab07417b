"""Moving cached activations between the offload device and the execution device.

On CUDA with a CPU cache, copies run on their own stream from pinned memory, one
batch ahead of the compute, and outputs go back the same way, so transfers hide
behind the layer's forward passes instead of adding to them. Elsewhere they are
plain synchronous copies: the same code path, minus the overlap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


class Transfers:
    def __init__(self, device: torch.device, offload: torch.device) -> None:
        self.device, self.offload = device, offload
        overlap = device.type == "cuda" and offload.type == "cpu"
        self.stream = torch.cuda.Stream(device) if overlap else None

    def _copy(self, tensor: torch.Tensor, device: torch.device, memo: dict[int, torch.Tensor]) -> torch.Tensor:
        if id(tensor) not in memo:  # a tensor shared by several arguments is copied once
            if self.stream is not None and device.type == "cpu":
                target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                memo[id(tensor)] = target.copy_(tensor, non_blocking=True)
            elif tensor.device.type == "cpu" and self.stream is not None and not tensor.is_pinned():
                memo[id(tensor)] = tensor.pin_memory().to(device, non_blocking=True)
            else:
                memo[id(tensor)] = tensor.to(device, non_blocking=self.stream is not None)
        return memo[id(tensor)]

    def to_offload(self, value: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
        """Send ``value`` (tensors, nested) to the offload device; returns immediately on CUDA."""
        memo = {} if memo is None else memo
        if self.stream is None:
            return map_tensors(value, lambda t: self._copy(t, self.offload, memo))
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = map_tensors(value, lambda t: self._copy(t, self.offload, memo))
        map_tensors(value, lambda t: t.record_stream(self.stream) if t.is_cuda else None)
        return out

    def _load(self, value: Any) -> tuple[Any, torch.cuda.Event | None]:
        memo: dict[int, torch.Tensor] = {}
        if self.stream is None:
            return map_tensors(value, lambda t: self._copy(t, self.device, memo)), None
        with torch.cuda.stream(self.stream):
            loaded = map_tensors(value, lambda t: self._copy(t, self.device, memo))
            event = torch.cuda.Event()
            event.record(self.stream)
        return loaded, event

    def iterate(self, values: Sequence[Any]) -> Iterator[Any]:
        """Yield each of ``values`` on the execution device, loading the next one meanwhile."""
        pending = self._load(values[0]) if values else None
        for index in range(len(values)):
            loaded, event = pending
            if index + 1 < len(values):
                pending = self._load(values[index + 1])
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                map_tensors(loaded, lambda t, stream=current: t.record_stream(stream))
            yield loaded

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _move_own_tensors(
    module: torch.nn.Module, device: torch.device, moved: list[tuple[torch.Tensor, torch.device]]
) -> None:
    """Move the tensors ``module`` holds directly, in place (``.data``), recording where they were.

    Parameters keep their identity, so every hook and reference to them stays valid.
    """
    for tensor in [*module._parameters.values(), *module._buffers.values()]:
        if tensor is not None and tensor.device != device:
            moved.append((tensor, tensor.device))
            tensor.data = tensor.data.to(device)


def _move_back(moved: list[tuple[torch.Tensor, torch.device]]) -> None:
    for tensor, home in moved:
        tensor.data = tensor.data.to(home)


@contextlib.contextmanager
def onloaded(modules: Iterable[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move the tensors held directly by ``modules`` to ``device`` for the block, then back."""
    moved: list[tuple[torch.Tensor, torch.device]] = []
    for module in modules:
        _move_own_tensors(module, device, moved)
    try:
        yield
    finally:
        _move_back(moved)


@contextlib.contextmanager
def lazily_onloaded(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move each of ``modules``' own tensors to ``device`` only when that module runs.

    Used for the modules around the layers during capture: the input embeddings
    come to the execution device, the output head (never reached) stays put.
    """
    moved: list[tuple[torch.Tensor, torch.device]] = []
    done: set[int] = set()

    def onload(module: torch.nn.Module, *_: Any) -> None:
        if id(module) not in done:
            done.add(id(module))
            _move_own_tensors(module, device, moved)

    handles = [m.register_forward_pre_hook(onload) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _move_back(moved)
