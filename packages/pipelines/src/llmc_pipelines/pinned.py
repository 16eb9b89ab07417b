"""Page-locked host memory for cached activations, handed out from large slabs.

torch pins host memory with ``cudaHostAlloc``, which locked about 2 GB/s on the H200
machine whatever the request's size: an 8B model's 512 × 2048 captured hidden states
(8.6 GB) took 4–5 s before the first layer could start. A slab here is ordinary memory
whose pages are first touched by torch's parallel fill (every core faults pages at once),
then registered with CUDA (``cudaHostRegister``): 7 GB/s measured the same way
(``benchmarks.layer_costs``), and about twice that again on transparent huge pages, which
slabs ask Linux for (``benchmarks.pinned_memory``; registering pages not yet touched is
slower). Slabs stay registered until :meth:`PinnedSlabs.close` (or until the object is
collected, if nobody closed it), and alive until then: memory is never freed while registered
(the range could not be registered again: "resource already mapped").

Even so, the capture of those hidden states waited about 1 s for slabs. Inside
:meth:`PinnedSlabs.ahead` a thread prepares slabs before the capture starts and ahead of it
while it runs the model (registering meanwhile slows it: 1.4 s against 0.8 s, H100, so the
capture waits for the slabs it is expected to fill before it starts).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import queue
import sys
import threading
import weakref
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

SLAB_BYTES = 256 * 2**20
_ALIGN = 4096
_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14  # linux/mman.h


class PinnedSlabs:
    """Hands out page-locked CPU tensors carved from registered slabs."""

    def __init__(self, slab_bytes: int = SLAB_BYTES) -> None:
        self.slab_bytes = slab_bytes
        self._slabs: list[torch.Tensor] = []  # the usable, aligned part of each slab
        self._registered: list[torch.Tensor] = []  # each slab whole, as registered
        self._release = weakref.finalize(self, _unregister, self._registered)
        self._release.atexit = False  # at exit the process lets go of everything anyway
        self._free = 0  # bytes left at the end of the last slab
        self._failed = False  # registration refused once, or closed: torch's own pinning from then on
        # slabs a thread prepares ahead of requests, and the thread (PinnedSlabs.ahead)
        self._ahead: tuple[queue.Queue, threading.Thread] | None = None

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised pinned 1-D tensor of ``numel`` elements of ``dtype``."""
        size = numel * torch.empty((), dtype=dtype).element_size()
        size_aligned = -(-size // _ALIGN) * _ALIGN
        if size == 0:
            return torch.empty(0, dtype=dtype)
        if self._failed:
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        if size_aligned > self._free:
            if not self._new_slab(max(self.slab_bytes, size_aligned)):
                return torch.empty(numel, dtype=dtype, pin_memory=True)
        slab = self._slabs[-1]
        start = slab.numel() - self._free
        self._free -= size_aligned
        return slab[start : start + size].view(dtype)

    def _new_slab(self, size: int) -> bool:
        slab = self._prepared() if size == self.slab_bytes else _register(size)
        if slab is None:
            self._failed = True
            return False
        raw, self._free = slab, size
        offset = (-raw.data_ptr()) % _ALIGN
        self._registered.append(raw)
        self._slabs.append(raw[offset : offset + size])
        return True

    def _prepared(self) -> torch.Tensor | None:
        """The next slab the thread prepared (waiting while it makes it), or one made here."""
        while self._ahead is not None:
            ready, thread = self._ahead
            try:
                return ready.get(timeout=0.05)
            except queue.Empty:
                if not thread.is_alive():  # it stopped: nothing more will come
                    break
        return _register(self.slab_bytes)

    @contextlib.contextmanager
    def ahead(self, count: int, device: torch.device, total: int = 0) -> Iterator[threading.Event]:
        """While inside, a thread registers slabs ahead of requests, so a caller filling them
        (the sequential pipeline's capture) waits for none of them: the first ``total`` at
        once (what the caller expects to take), then ``count`` ahead of the requests. Yields
        an event set once those ``total`` are registered (or the thread gave up): a caller
        that waits for it before its own work starts has no registration slow it down, as
        registering while a thread launches kernels does. The slabs no request took are
        unregistered and freed on leaving."""
        ready: queue.Queue = queue.Queue()
        stop, prepared = threading.Event(), threading.Event()

        def prepare() -> None:
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                made = 0
                while not stop.is_set():
                    if made >= total:
                        prepared.set()
                        if ready.qsize() >= count:  # wait for a request to take one
                            stop.wait(0.01)
                            continue
                    slab = _register(self.slab_bytes)
                    made += 1
                    ready.put(slab)
                    if slab is None:  # refused: the requests pin with torch from now on
                        return
            finally:
                prepared.set()

        thread = threading.Thread(target=prepare, name="llmc-pinned-slabs", daemon=True)
        if self._failed:
            prepared.set()
        else:
            self._ahead = ready, thread
            thread.start()
        try:
            yield prepared
        finally:
            self._ahead = None
            stop.set()
            if thread.is_alive():
                thread.join()
            while not ready.empty():
                slab = ready.get()
                _unregister([slab] if slab is not None else [])

    def close(self) -> None:
        """Unregister every slab (call once no copy from or into them is pending); the tensors
        carved from them stay valid, as ordinary memory. Later requests pin with torch."""
        self._release()
        self._slabs.clear()
        self._free = 0
        self._failed = True


def _register(size: int, huge: bool = True, fill: bool = True) -> torch.Tensor | None:
    """A registered slab of ``size`` usable bytes past its alignment, or None if refused
    (``huge`` and ``fill`` off only to measure the alternatives: ``benchmarks.pinned_memory``)."""
    raw = torch.empty(size + _HUGE_PAGE, dtype=torch.uint8)
    if huge:
        _advise_huge_pages(raw)
    if fill:
        raw.zero_()  # faults every page in, on every core, before CUDA locks them
    # registered whole: torch asks CUDA about a view's storage base, not the view
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0)
    if int(error) != 0:
        clear = getattr(cudart, "cudaGetLastError", None)
        if clear is not None:  # or torch's next launch check reports it
            clear()
        logger.debug("cudaHostRegister refused %d bytes (error %s); pinning with torch instead.", size, error)
        return None
    return raw


def _advise_huge_pages(raw: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages over ``raw``'s whole 2 MiB pages: a 2 MiB page
    faults in and registers at twice the rate of 4 KiB ones (``benchmarks.pinned_memory``)."""
    if sys.platform != "linux":
        return
    start = -(-raw.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    length = (raw.data_ptr() + raw.numel() - start) // _HUGE_PAGE * _HUGE_PAGE
    if length > 0:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)


def _unregister(registered: list[torch.Tensor]) -> None:
    """Unregister the slabs, then let them go (views carved from them keep their memory)."""
    for raw in registered:
        torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())
    registered.clear()
