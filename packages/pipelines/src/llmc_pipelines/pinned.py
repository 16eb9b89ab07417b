"""Page-locked host memory for cached activations, handed out from large slabs.

torch pins host memory with ``cudaHostAlloc``, which locked about 2 GB/s on the H200
machine whatever the request's size: an 8B model's 512 × 2048 captured hidden states
(8.6 GB) took 4–5 s before the first layer could start. A slab here is ordinary memory
whose pages are first touched by torch's parallel fill (every core faults pages at once),
then registered with CUDA (``cudaHostRegister``): 7 GB/s measured the same way
(``benchmarks.layer_costs``). Slabs stay registered until :meth:`PinnedSlabs.close` (or
until the object is collected, if nobody closed it), and alive until then: memory is never
freed while registered (the range could not be registered again: "resource already mapped").
"""

from __future__ import annotations

import logging
import weakref

import torch

logger = logging.getLogger(__name__)

SLAB_BYTES = 256 * 2**20
_ALIGN = 4096


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

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised pinned 1-D tensor of ``numel`` elements of ``dtype``."""
        size = numel * torch.empty((), dtype=dtype).element_size()
        size_aligned = -(-size // _ALIGN) * _ALIGN
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
        raw = torch.empty(size + _ALIGN, dtype=torch.uint8)
        raw.zero_()  # faults every page in, on every core, before CUDA locks them
        # registered whole: torch asks CUDA about a view's storage base, not the view
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0)
        if int(error) != 0:
            clear = getattr(cudart, "cudaGetLastError", None)
            if clear is not None:  # or torch's next launch check reports it
                clear()
            logger.debug("cudaHostRegister refused %d bytes (error %s); pinning with torch instead.", size, error)
            self._failed = True
            return False
        offset = (-raw.data_ptr()) % _ALIGN
        self._registered.append(raw)
        self._slabs.append(raw[offset : offset + size])
        self._free = size
        return True

    def close(self) -> None:
        """Unregister every slab (call once no copy from or into them is pending); the tensors
        carved from them stay valid, as ordinary memory. Later requests pin with torch."""
        self._release()
        self._slabs.clear()
        self._free = 0
        self._failed = True


def _unregister(registered: list[torch.Tensor]) -> None:
    """Unregister the slabs, then let them go (views carved from them keep their memory)."""
    for raw in registered:
        torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())
    registered.clear()
