"""The compressed-tensors kernels that llmc compresses weights with: its eager torch ones."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from compressed_tensors.utils import impl_backend

_lock = threading.Lock()
_depth = 0
_saved = False


@contextlib.contextmanager
def eager_kernels() -> Iterator[None]:
    """Run compressed-tensors' eager torch kernels instead of its Triton ones inside the block.

    Why: on a GPU, compressed-tensors' Triton kernels are compiled (or loaded from
    Triton's cache) on first use in every process, 1-2 s per scheme on an H100, for
    work that takes milliseconds eagerly; and the eager kernels round exactly as on
    a CPU, so ``oneshot`` and ``model_free_ptq`` write the same bytes whichever
    device ran them. Nested and concurrent blocks (worker threads) share one switch,
    restored when the last one ends.
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = impl_backend.ENFORCE_EAGER
            impl_backend.ENFORCE_EAGER = True
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                impl_backend.ENFORCE_EAGER = _saved
