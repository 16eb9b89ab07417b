"""Moving cached activations between the offload device and the execution device.

On CUDA with a CPU cache, activation copies run on their own streams from pinned
memory, a chunk of batches ahead of the compute, and outputs go back the same way
(into the buffers their inputs came from), so transfers hide behind the layer's
forward passes instead of adding to them. Elsewhere they are plain synchronous
copies: the same code path, minus the overlap. Weights move with
:mod:`llmc_pipelines.onloading`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

# Batches whose copies share one stream switch: up to this many bytes of hidden states, and
# at most _CHUNK_BATCHES. Each batch of a chunk is on the device at once (next chunk loading,
# last chunk's outputs returning), so the budget stays small against a layer's own memory.
_CHUNK_BYTES = 16 * 2**20
_CHUNK_BATCHES = 8


def _chunk_size(hidden: torch.Tensor) -> int:
    """Batches moved per stream switch: many when batches are small, one when they are large."""
    return max(1, min(_CHUNK_BATCHES, _CHUNK_BYTES // max(1, hidden.numel() * hidden.element_size())))


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
    if a is b:  # models pass every layer the same objects: no need to walk them
        return True
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
        # offload-side buffers written by the last storing pass, each with the event that ends
        # its chunk's copies: a later load waits for its own chunk, not for the whole pass
        self._stored: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._offloaded = False  # to_offload copies queued since the last forward

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
        self._offloaded = True
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

    def _allocate(
        self, value: Any, memo: dict[int, torch.Tensor], copies: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> Any:
        """Device buffers for ``value``'s tensors, their copies queued in ``copies``.

        Buffers are allocated on the compute stream, their only reader, so the
        caching allocator needs no ``record_stream`` for them; the copy that writes
        one waits for the kernels already launched there (see :meth:`_on`).
        """

        def allocate(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in memo:
                memo[id(tensor)] = torch.empty_like(tensor, device=self.device)
                copies.append((memo[id(tensor)], tensor))
            return memo[id(tensor)]

        return map_tensors(value, allocate)

    def _on(
        self,
        stream: torch.cuda.Stream,
        copies: list[tuple[torch.Tensor, torch.Tensor]],
        after: Iterable[torch.cuda.Event] = (),
    ) -> None:
        """Queue ``copies`` on ``stream`` behind everything launched on the compute stream so
        far (a store reads its outputs; a load may write into device memory that batches
        already launched still read, freed to the allocator and handed out again) and
        behind ``after``."""
        compute = torch.cuda.current_stream(self.device)
        stream.wait_stream(compute)
        for event in after:
            stream.wait_event(event)
        torch.cuda.set_stream(stream)
        try:
            for target, source in copies:
                target.copy_(source, non_blocking=True)
        finally:
            torch.cuda.set_stream(compute)

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
        CPU cache, the next chunk of inputs loads and the last chunk's outputs
        return on copy streams while ``fn`` computes; copies go a chunk at a time
        because switching streams and synchronising them costs the launching
        thread ~50 µs, as much as a small batch's kernels.
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
        if self._offloaded:  # captured inputs may still be arriving
            self.loads.wait_stream(self.stores)
            self._offloaded = False
        stored = self._stored  # inputs may be the last pass's outputs, still arriving
        if store:
            self._stored = {}
        memo: dict[int, torch.Tensor] = {}  # call tensors shared by several calls load once
        size = _chunk_size(inputs[0][0]) if inputs else 1

        def load(start: int) -> tuple[list[Any], torch.cuda.Event]:
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            arriving: dict[int, torch.cuda.Event] = {}
            loaded = []
            for hidden, call in inputs[start : start + size]:
                if id(call) not in calls:
                    calls[id(call)] = self._allocate(call, memo, copies)
                loaded.append((self._allocate(hidden, {}, copies), calls[id(call)]))
                buffer, event = stored.get(id(hidden), (None, None))
                if buffer is hidden:
                    arriving[id(event)] = event
            self._on(self.loads, copies, arriving.values())
            return loaded, self.loads.record_event()

        pending = load(0) if inputs else None
        for start in range(0, len(inputs), size):
            loaded, event = pending
            if start + size < len(inputs):
                pending = load(start + size)
            compute.wait_event(event)
            results = []
            for offset in range(len(loaded)):
                hidden, call = loaded[offset]
                loaded[offset] = None  # each input's buffer frees once its batch ran
                out = fn(start + offset, hidden, call)
                del hidden
                if outputs is not None:
                    results.append(out)
            if outputs is not None:
                copies = []
                for offset, out in enumerate(results):
                    source = inputs[start + offset][0]
                    same = source.shape == out.shape and source.dtype == out.dtype and source.is_pinned()
                    target = source if same else torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    copies.append((target, out))
                    outputs.append(target)
                self._on(self.stores, copies)
                event = self.stores.record_event()
                for (target, _), out in zip(copies, results, strict=True):
                    self._stored[id(target)] = (target, event)
                    out.record_stream(self.stores)
        return outputs

    def synchronize(self) -> None:
        """Wait for every copy: outputs stored by :meth:`forward` are complete after this."""
        if self.stores is not None:
            self.stores.synchronize()
            self.loads.synchronize()

