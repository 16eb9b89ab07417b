"""Bringing a module's weights to the execution device for its turn, and home after.

Tensors move in place (``.data``): parameters keep their identity, so every hook
and reference to them stays valid.

:class:`Onloader` moves the sequential targets one after another. From CPU
memory to CUDA a synchronous copy from pageable memory blocks the thread that
launches the kernels for milliseconds per layer, so a worker thread copies the
next target's tensors into pinned staging memory while the current target runs
(plain CPU copies, which release the GIL; once its pinned buffers are made, the
worker makes no CUDA call but waiting on an event) and, after the target's turn,
back from it into the CPU memory they came from; the main thread moves a whole target in one
asynchronous copy each way, each on its own copy stream. The device buffer comes
from the load stream's own pool of the caching allocator, which no kernel reads,
so the load starts at once, while the device still runs the last target's queued
kernels; the compute stream waits for it before the target's first kernel.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from llmc_pipelines.pinned import PinnedSlabs

_ALIGN = 256  # bytes: every dtype's alignment, and the device allocator's granularity


def _own_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers ``modules`` hold directly, each tensor once."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _move_own_tensors(
    module: torch.nn.Module, device: torch.device, moved: list[tuple[torch.Tensor, torch.device]]
) -> None:
    """Move the tensors ``module`` holds directly to ``device``, recording where they were."""
    for tensor in _own_tensors([module]):
        if tensor.device != device:
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
    They only run there, and no lifecycle event lets a modifier change them, so
    on exit each tensor gets back the very memory it had and the device copy is
    dropped: no copy home (a synchronous one, for an embedding tens of
    milliseconds, and a device sync before the first layer). A tensor replaced
    meanwhile keeps its replacement, moved home.
    """
    homes: list[tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]] = []
    done: set[int] = set()

    def onload(module: torch.nn.Module, *_: Any) -> None:
        if id(module) not in done:
            done.add(id(module))
            for tensor in _own_tensors([module]):
                if tensor.device != device:
                    home = tensor.data
                    tensor.data = home.to(device)
                    homes.append((tensor, home, _signature(tensor)))

    handles = [m.register_forward_pre_hook(onload) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for tensor, home, onloaded_as in homes:
            tensor.data = home if _signature(tensor) == onloaded_as else tensor.data.to(home.device)


def _signature(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What identifies a tensor's data: ``.data`` is a new object on every access."""
    return tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.stride(), tensor.device


def _stageable(tensor: torch.Tensor) -> bool:
    return (
        tensor.device.type == "cpu" and tensor.layout == torch.strided and not tensor.is_quantized
    )


class _Staged:
    """One target's CPU tensors laid out in a pinned buffer: where each one goes."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.signatures = [_signature(t) for t in tensors]  # to notice replacements
        self.offsets: list[int] = []
        size = 0
        for t in tensors:
            self.offsets.append(size)
            size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.size = size
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.homes: list[torch.Tensor] = []  # the CPU tensors, while the target is onloaded

    def view(self, flat: torch.Tensor, index: int, like: torch.Tensor) -> torch.Tensor:
        """Bytes of tensor ``index`` in ``flat`` (pinned buffer or device copy), shaped ``like``."""
        offset = self.offsets[index]
        return (
            flat[offset : offset + like.numel() * like.element_size()]
            .view(like.dtype)
            .view(like.shape)
        )

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [self.view(flat, i, t) for i, t in enumerate(self.tensors)]

    def replaced(self) -> bool:
        return any(_signature(t) != s for t, s in zip(self.tensors, self.signatures, strict=True))


class Onloader:
    """Each target's own tensors on ``device`` during :meth:`onloaded`, home after.

    Call :meth:`settle` before anything outside the running target may read
    weights (a modifier's layer-end event), and :meth:`close` at the end: the
    copies home finish in the background.
    """

    def __init__(self, targets: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.targets = list(targets)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.staging = device.type == "cuda"
        self._worker = (
            ThreadPoolExecutor(1, thread_name_prefix="llmc-onload") if self.staging else None
        )
        self._loads = torch.cuda.Stream(device) if self.staging else None
        self._stores = torch.cuda.Stream(device) if self.staging else None
        # two pinned buffers, grown on demand; consecutive targets alternate between them
        self._pinned = PinnedSlabs(slab_bytes=1) if self.staging else None  # a slab per buffer
        self._buffers = [torch.empty(0, dtype=torch.uint8)] * 2
        self._staged: dict[int, Future[_Staged | None]] = {}
        self._pending: list[Future[Any]] = []
        self._lock = threading.Lock()
        if self.staging and self.targets:  # ready by the time the first target's turn comes
            self._staged[0] = self._submit(self._prepare)

    def _prepare(self) -> _Staged | None:
        """Worker: both pinned buffers, sized for the first two targets, then the first staged.

        Pinning memory stalls the other threads' CUDA calls: while torch pinned a
        Llama-3-8B layer's 0.44 GB (159 ms, H100) the device sat idle for as long. Both
        buffers are made before the first target's turn (the capture waits for it), so
        none while the capture runs."""
        torch.cuda.set_device(self.device)  # the buffers are registered with its context
        layout = self._stage(0)  # makes the first buffer
        if len(self.targets) > 1:
            self._buffer(1, _Staged(self._cpu_tensors(1)).size)
        return layout

    def _cpu_tensors(self, index: int) -> list[torch.Tensor]:
        return [t for t in _own_tensors(self.targets[index].modules()) if _stageable(t)]

    def _buffer(self, slot: int, size: int) -> torch.Tensor:
        with self._lock:  # the worker stages; the main thread stages again a replaced target
            if self._buffers[slot].numel() < size:
                assert self._pinned is not None
                self._buffers[slot] = self._pinned.empty(size, torch.uint8)
            return self._buffers[slot]

    def _stage(self, index: int) -> _Staged | None:
        """Worker: copy target ``index``'s CPU tensors into its pinned buffer."""
        tensors = self._cpu_tensors(index)
        if not tensors:
            return None
        layout = _Staged(tensors)
        layout.buffer = self._buffer(index % 2, layout.size)
        # one call: each op called from this thread hands the GIL back and forth with
        # the thread launching the kernels
        torch._foreach_copy_(layout.views(layout.buffer), [t.data for t in tensors])
        return layout

    def _submit(self, fn: Any, *args: Any) -> Future[Any]:
        assert self._worker is not None
        future = self._worker.submit(fn, *args)
        self._pending.append(future)
        return future

    def settle(self) -> None:
        """Wait for the worker: earlier targets' tensors are home, the next one is staged."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    @contextlib.contextmanager
    def onloaded(self, index: int) -> Iterator[None]:
        """Target ``index``'s tensors on the device for the block; the next target is staged meanwhile."""
        if not self.staging:
            with onloaded(self.targets[index].modules(), self.device):
                yield
            return
        if index not in self._staged:
            self._staged[index] = self._submit(self._stage, index)
        layout = self._staged.pop(index).result()
        if layout is not None and layout.replaced():
            # replaced while staged (by the previous target's layer-end event): stage again
            layout = self._stage(index)
        if layout is not None:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._loads):
                flat = torch.empty(layout.size, dtype=torch.uint8, device=self.device)
                flat.copy_(layout.buffer[: layout.size], non_blocking=True)
            compute.wait_stream(self._loads)
            flat.record_stream(compute)
            layout.homes = [t.data for t in layout.tensors]  # where they go back after
            for tensor, view in zip(layout.tensors, layout.views(flat), strict=True):
                tensor.data = view
            layout.signatures = [_signature(t) for t in layout.tensors]
        try:
            # tensors that live neither on the CPU nor on this device move directly
            with onloaded(self.targets[index].modules(), self.device):
                if index + 1 < len(self.targets):
                    self._staged[index + 1] = self._submit(self._stage, index + 1)
                yield
        finally:
            if layout is not None:
                self._send_home(layout, flat)

    def _send_home(self, layout: _Staged, flat: torch.Tensor) -> None:
        """Copy the target back through its pinned buffer into the CPU memory it came from,
        in the background.

        Writing back in place, as offloading frameworks update offloaded weights, spares
        allocating and freeing a layer's worth of CPU memory per target: page faults and
        unmapping, the latter while holding the GIL the launching thread needs.
        """
        homes, views = [], []
        for i, (tensor, onloaded_as, home) in enumerate(
            zip(layout.tensors, layout.signatures, layout.homes, strict=True)
        ):
            if _signature(tensor) == onloaded_as:
                tensor.data = home
                homes.append(home)
                views.append(layout.view(layout.buffer, i, home))
            else:  # replaced during the block (e.g. compressed): moves on its own
                tensor.data = tensor.data.to("cpu")
        layout.homes = []
        self._stores.wait_stream(torch.cuda.current_stream(self.device))  # edits included
        with torch.cuda.stream(self._stores):
            layout.buffer[: layout.size].copy_(flat, non_blocking=True)
        flat.record_stream(self._stores)
        done = self._stores.record_event()

        def fill() -> None:
            done.synchronize()
            if homes:
                torch._foreach_copy_(homes, views)

        self._submit(fill)

    def close(self) -> None:
        """Wait for every copy home; the worker stops."""
        if self._worker is not None:
            try:
                self.settle()
            finally:
                self._worker.shutdown()
                assert self._pinned is not None
                self._pinned.close()  # no copy is pending: the buffers need not stay pinned
