"""Moving cached activations and layer weights between their home and the execution device.

On CUDA with a CPU cache, activation copies run on their own streams from pinned
memory, one batch ahead of the compute, and outputs go back the same way (into
the buffers their inputs came from), so transfers hide behind the layer's
forward passes instead of adding to them. Elsewhere they are plain synchronous
copies: the same code path, minus the overlap.
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


def same_tree(a: Any, b: Any) -> bool:
    """Whether two nested argument structures hold the very same tensors (by identity)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
        )
    return a is b or (type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b)


class Transfers:
    """Copies between the offload device (where cached activations live) and the execution device."""

    def __init__(self, device: torch.device, offload: torch.device) -> None:
        self.device, self.offload = device, offload
        overlap = device.type == "cuda" and offload.type == "cpu"
        # one stream per direction: each has its own copy engine, and a load never waits
        # behind a store that waits for the compute
        self.stores = torch.cuda.Stream(device) if overlap else None  # to the offload device
        self.loads = torch.cuda.Stream(device) if overlap else None  # to the execution device

    def _copy(
        self, tensor: torch.Tensor, device: torch.device, memo: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        if id(tensor) not in memo:  # a tensor shared by several arguments is copied once
            if self.stores is not None and device.type == "cpu":
                target = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                memo[id(tensor)] = target.copy_(tensor, non_blocking=True)
            else:
                memo[id(tensor)] = tensor.to(device)
        return memo[id(tensor)]

    def to_offload(self, value: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
        """Send ``value`` (tensors, nested) to the offload device; returns immediately on CUDA."""
        memo = {} if memo is None else memo
        if self.stores is None:
            return map_tensors(value, lambda t: self._copy(t, self.offload, memo))
        self.stores.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stores):
            out = map_tensors(value, lambda t: self._copy(t, self.offload, memo))
        map_tensors(value, lambda t: t.record_stream(self.stores) if t.is_cuda else None)
        return out

    def offload_arguments(
        self, value: Any, memo: dict[int, torch.Tensor], latest: dict[tuple, Any]
    ) -> Any:
        """Like :meth:`to_offload`, but a tensor equal to the last batch's in its place is not
        stored again.

        Rotary tables, position ids and masks are usually the same in every batch:
        stored once, the calls that use them can be shared too (see :func:`same_tree`),
        and loaded once per target instead of once per batch. ``latest`` (kept by the
        caller across batches) holds the last tensor seen at each place in the arguments.
        """
        leaves: list[torch.Tensor] = []
        map_tensors(value, leaves.append)
        keys = [(place, t.shape, t.dtype, t.device) for place, t in enumerate(leaves)]
        for key, tensor in zip(keys, leaves, strict=True):
            last = latest.get(key)
            if id(tensor) not in memo and last is not None and torch.equal(last[0], tensor):
                memo[id(tensor)] = last[1]
        out = self.to_offload(value, memo)
        for key, tensor in zip(keys, leaves, strict=True):
            latest[key] = (tensor, memo[id(tensor)])
        return out

    def _to_device(
        self, value: Any, memo: dict[int, torch.Tensor], compute: torch.cuda.Stream
    ) -> Any:
        """Queue ``value``'s copy to the execution device on the load stream.

        Targets are allocated on the compute stream, their only reader, so the
        caching allocator needs no ``record_stream`` for them.
        """
        fresh: list[tuple[torch.Tensor, torch.Tensor]] = []

        def allocate(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in memo:
                memo[id(tensor)] = torch.empty_like(tensor, device=self.device)
                fresh.append((memo[id(tensor)], tensor))
            return memo[id(tensor)]

        loaded = map_tensors(value, allocate)
        torch.cuda.set_stream(self.loads)
        try:
            for target, source in fresh:
                target.copy_(source, non_blocking=True)
        finally:
            torch.cuda.set_stream(compute)
        return loaded

    def forward(
        self,
        inputs: Sequence[tuple[torch.Tensor, Any]],
        fn: Callable[[int, torch.Tensor, Any], torch.Tensor],
        store: bool,
    ) -> list[torch.Tensor] | None:
        """``fn(index, hidden, call)`` on each input brought to the execution device.

        ``inputs`` are (hidden states, call arguments) on the offload device; calls
        that are the same object are loaded once. With ``store`` the outputs come
        back to the offload device; this pass is then the last use of the inputs, so
        an output overwrites its input's buffer when shapes match. On CUDA with a
        CPU cache, the next input loads and the last output returns on copy streams
        while ``fn`` computes.
        """
        outputs: list[torch.Tensor] | None = [] if store else None
        calls: dict[int, Any] = {}
        if self.stores is None:
            for index, (hidden, call) in enumerate(inputs):
                if id(call) not in calls:
                    calls[id(call)] = map_tensors(call, lambda t: t.to(self.device))
                out = fn(index, hidden.to(self.device), calls[id(call)])
                if outputs is not None:
                    outputs.append(out.to(self.offload))
            return outputs
        compute = torch.cuda.current_stream(self.device)
        memo: dict[int, torch.Tensor] = {}  # call tensors shared by several calls load once

        def load(index: int) -> tuple[torch.Tensor, Any, torch.cuda.Event]:
            hidden, call = inputs[index]
            loaded_hidden = self._to_device(hidden, {}, compute)
            if id(call) not in calls:
                calls[id(call)] = self._to_device(call, memo, compute)
            return loaded_hidden, calls[id(call)], self.loads.record_event()

        pending = load(0) if inputs else None
        for index in range(len(inputs)):
            hidden, call, event = pending
            if index + 1 < len(inputs):
                pending = load(index + 1)
            compute.wait_event(event)
            out = fn(index, hidden, call)
            if outputs is not None:
                source = inputs[index][0]
                same = (
                    source.shape == out.shape and source.dtype == out.dtype and source.is_pinned()
                )
                target = (
                    source if same else torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                )
                self.stores.wait_stream(compute)
                torch.cuda.set_stream(self.stores)
                try:
                    outputs.append(target.copy_(out, non_blocking=True))
                finally:
                    torch.cuda.set_stream(compute)
                out.record_stream(self.stores)
        return outputs

    def synchronize(self) -> None:
        if self.stores is not None:
            self.stores.synchronize()
            self.loads.synchronize()


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
    """Move the tensors held directly by ``modules`` to ``device`` for the block, then back.

    Synchronous on purpose: loading the next target from a worker thread measured
    slower on the GPU machine (the worker's copies stall the thread that launches
    the kernels), so only the running target is ever on the device.
    """
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
