"""Moving cached activations between the offload device and the execution device.

Each batch's hidden states live in a :class:`Chunk`: consecutive batches packed in
one flat buffer, so a chunk of batches loads in one copy. On CUDA with a CPU cache
the buffers are pinned and the copies run on their own streams: the next chunk
loads while the layer runs on this one, and the outputs go home into the buffers
their inputs came from, so transfers hide behind the layer's forward passes
instead of adding to them. Elsewhere they are plain synchronous copies, or none
when the cache is on the execution device: the same code path, minus the overlap.
What a layer was given is never overwritten, so a modifier may keep a layer's
inputs. Weights move with :mod:`llmc_pipelines.onloading`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from llmc.tensors import map_tensors
from llmc_pipelines.pinned import PinnedSlabs

# A chunk holds up to this many bytes of hidden states, and at most _CHUNK_BATCHES batches.
# A chunk is on the device at once (and the next one loading, and the last one's outputs
# returning), so the budget stays small against a layer's own memory.
_CHUNK_BYTES = 16 * 2**20
_CHUNK_BATCHES = 8
# pinned slabs prepared ahead of the capture's stores: 1 GiB, ahead of it by about 0.2 s
_SLABS_AHEAD = 4


class Chunk:
    """Hidden states of consecutive batches on the offload device, packed in one flat buffer
    when they can be: a packed chunk moves to the execution device in one copy.

    Queueing a copy and switching streams cost the launching thread tens of
    microseconds, as much as a small batch's kernels: a chunk pays for its loads once.
    """

    def __init__(self, batches: list[torch.Tensor], flat: torch.Tensor | None = None) -> None:
        self.batches = batches  # each batch's hidden states; views of ``flat`` when packed
        self.flat = flat  # 1-D; its first ``size`` elements hold the batches, in order
        self.size = 0
        self.shape: torch.Size | None = None  # of every packed batch, while they share one
        self.stored: torch.cuda.Event | None = None  # ends the last copy into ``batches``
        self.loaded: torch.cuda.Event | None = None  # ends the last copy to the execution device

    @classmethod
    def packed(
        cls,
        like: Sequence[torch.Tensor],
        device: torch.device,
        pinned: bool,
        room: int = 0,
        slabs: PinnedSlabs | None = None,
    ) -> Chunk:
        """A chunk of empty batches shaped as ``like`` (one dtype), in one buffer with room
        for ``room`` more elements (carved from ``slabs`` when pinned and given)."""
        numels = [t.numel() for t in like]
        if pinned and slabs is not None:
            flat = slabs.empty(sum(numels) + room, like[0].dtype)
        else:
            flat = torch.empty(sum(numels) + room, dtype=like[0].dtype, device=device, pin_memory=pinned)
        chunk = cls([], flat)
        for t in like:
            chunk.add(t.shape)
        return chunk

    def __len__(self) -> int:
        return len(self.batches)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether a batch like ``tensor`` packs after this chunk's batches."""
        return (
            self.flat is not None
            and tensor.dtype == self.flat.dtype
            and self.size + tensor.numel() <= self.flat.numel()
            and len(self.batches) < _CHUNK_BATCHES
        )

    def add(self, shape: torch.Size) -> torch.Tensor:
        """Room for one more batch of ``shape`` in the buffer: its view."""
        assert self.flat is not None
        self.shape = shape if not self.batches or shape == self.shape else None
        start, self.size = self.size, self.size + shape.numel()
        self.batches.append(self.flat[start : self.size].view(shape))
        return self.batches[-1]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each batch's hidden states in ``flat``, a copy of this chunk's ``size`` packed
        elements (batches of one shape split in one call: each call costs the launching
        thread as much as a small kernel)."""
        if self.shape is not None:
            return list(flat.view(len(self.batches), *self.shape).unbind(0))
        parts = flat.split([b.numel() for b in self.batches])
        return [part.view(b.shape) for part, b in zip(parts, self.batches, strict=True)]


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor], non_blocking: bool) -> None:
    """``targets[i].copy_(sources[i])`` for every ``i``, in as few calls as can be."""
    if len(targets) == 1:
        targets[0].copy_(sources[0], non_blocking=non_blocking)
    else:
        torch._foreach_copy_(targets, sources, non_blocking=non_blocking)


def batches(chunks: Iterable[Chunk]) -> list[torch.Tensor]:
    """Every batch's hidden states, in order."""
    return [batch for chunk in chunks for batch in chunk.batches]


def same_tree(a: Any, b: Any) -> bool:
    """Whether two nested argument structures hold the very same tensors (by identity).

    Called for every target of every captured batch: identical members are checked
    before any recursion, since models pass every layer the same objects."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(
            x is y or same_tree(x, y) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] or same_tree(a[k], b[k]) for k in a)
    return isinstance(a, (bool, int, float, str)) and a == b


def equal(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """``torch.equal`` of each pair of tensors alike in shape, dtype and device, with one
    wait for the device instead of one per pair: the capture compares a few arguments a
    batch, and each wait idles the thread that launches the kernels (elsewhere, one
    ``torch.equal`` each: no wait to save, and cheaper)."""
    devices = {a.device for a, _ in pairs}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return [torch.equal(a, b) for a, b in pairs]
    return _equal_at_once(pairs)


def _equal_at_once(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """Every pair compared on its device, the answers read back together (one wait)."""
    return torch.stack([torch.eq(a, b).all() for a, b in pairs]).tolist()


def _resolved(device: torch.device) -> torch.device:
    """``cuda`` as the device index tensors report (``cuda:0``), so devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Transfers:
    """Copies between the offload device (where cached activations live) and the execution device.

    With copy streams, no tensor of a pass is marked with ``record_stream``: while any
    such mark is pending, every allocation (dozens per layer call) queries its event,
    which slows the launching thread by a tenth. Instead each load is queued behind the
    kernels already launched (so it never writes memory they may still read, even
    memory a modifier kept and freed later) and runs while the device computes the
    chunk before it; the outputs stay referenced until the compute stream has waited
    for their store.
    """

    def __init__(self, device: torch.device, offload: torch.device) -> None:
        self.device, self.offload = _resolved(device), _resolved(offload)
        overlap = device.type == "cuda" and offload.type == "cpu"
        # one stream per direction: each has its own copy engine, and a load never waits
        # behind a store that waits for the compute
        self.stores = torch.cuda.Stream(self.device) if overlap else None  # to the offload device
        self.loads = torch.cuda.Stream(self.device) if overlap else None  # to the execution device
        # pinned buffers of stored batches (capture; outputs later go home into them)
        self.slabs = PinnedSlabs() if overlap else None
        self._offloaded = False  # stores queued outside forward (capture) since the last forward
        # re-recorded for every wait on the compute stream: creating an event costs the
        # launching thread as much as recording it
        self._mark = torch.cuda.Event() if overlap else None

    def capturing(self, expected_bytes: int = 0) -> contextlib.AbstractContextManager[threading.Event]:
        """The capture's context: pinned slabs prepared on a thread, the ``expected_bytes``
        the capture will store first, then a few ahead of its stores
        (:meth:`llmc_pipelines.pinned.PinnedSlabs.ahead`). Yields an event set once the
        expected slabs are registered: the capture waits for it before it starts, since
        registering while it runs slows it. Without pinned slabs, nothing (the event is set)."""
        if self.slabs is None:
            prepared = threading.Event()
            prepared.set()
            return contextlib.nullcontext(prepared)
        return self.slabs.ahead(_SLABS_AHEAD, self.device, total=-(-expected_bytes // self.slabs.slab_bytes))

    def to_offload(self, value: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
        """Send ``value`` (tensors, nested) to the offload device; returns immediately on CUDA.
        A tensor in ``memo`` (by id) is not sent again: its entry stands in for it."""
        memo = {} if memo is None else memo
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []

        def place(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in memo:  # a tensor shared by several arguments is sent once
                pinned = self.stores is not None
                memo[id(tensor)] = torch.empty_like(tensor, device=self.offload, pin_memory=pinned)
                targets.append(memo[id(tensor)])
                sources.append(tensor)
            return memo[id(tensor)]

        out = map_tensors(value, place)
        if targets:
            self._send(targets, sources)
            self._offloaded = True
        return out

    def append(self, chunks: list[Chunk], hidden: torch.Tensor) -> None:
        """Store one batch's hidden states after the last batch of ``chunks`` (in a new chunk
        when it is full); returns immediately on CUDA."""
        if chunks and chunks[-1].fits(hidden):
            target = chunks[-1].add(hidden.shape)
        else:
            per_chunk = _CHUNK_BYTES // max(1, hidden.numel() * hidden.element_size())
            room = hidden.numel() * (max(1, min(_CHUNK_BATCHES, per_chunk)) - 1)
            chunks.append(Chunk.packed([hidden], self.offload, self.stores is not None, room, self.slabs))
            target = chunks[-1].batches[-1]
        self._send([target], [hidden])
        self._offloaded = True

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
        compared = {
            id(tensor): (tensor, latest[key])
            for key, tensor in zip(keys, leaves, strict=True)
            if id(tensor) not in memo and key in latest
        }
        pairs = [(last[0], tensor) for tensor, last in compared.values()]
        for (tensor, last), same in zip(compared.values(), equal(pairs), strict=True):
            if same:
                memo[id(tensor)] = last[1]
        out = self.to_offload(value, memo)
        for key, tensor in zip(keys, leaves, strict=True):
            latest[key] = (tensor, memo[id(tensor)])
        return out

    def _send(
        self,
        targets: list[torch.Tensor],
        sources: list[torch.Tensor],
        compute: torch.cuda.Stream | None = None,
        record: bool = True,
        event: torch.cuda.Event | None = None,
    ) -> None:
        """Copy ``sources`` (execution device) into ``targets`` (offload device); on CUDA
        queued on the store stream behind the kernels that compute them (on ``compute``,
        the current stream by default), recording ``event`` where the copies end.
        Without ``record`` the caller keeps ``sources`` alive until ``compute`` waited for
        that event; with it, the caching allocator does."""
        if self.stores is None:
            _copy(targets, sources, non_blocking=False)
            return
        if compute is None:
            compute = torch.cuda.current_stream(self.device)
        self._behind(self.stores, compute)
        torch.cuda.set_stream(self.stores)
        try:
            _copy(targets, sources, non_blocking=True)
        finally:
            torch.cuda.set_stream(compute)
        if record:
            for source in sources:
                if source.is_cuda:
                    source.record_stream(self.stores)
        if event is not None:
            event.record(self.stores)

    def _behind(self, stream: torch.cuda.Stream, compute: torch.cuda.Stream) -> None:
        """``stream`` waits for the kernels queued on ``compute`` so far (a wait binds to the
        event's last record, so one event serves every wait)."""
        self._mark.record(compute)
        stream.wait_event(self._mark)

    def _bring(
        self,
        tensor: torch.Tensor,
        memo: dict[int, torch.Tensor],
        copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """``tensor`` on the execution device: itself, a synchronous copy, or (with copy
        streams) a buffer whose copy is queued in ``copies``."""
        if tensor.device == self.device:
            return tensor
        if id(tensor) not in memo:  # a tensor shared by several calls loads once
            if self.loads is None:
                memo[id(tensor)] = tensor.to(self.device)
            else:
                memo[id(tensor)] = torch.empty_like(tensor, device=self.device)
                copies.append((memo[id(tensor)], tensor))
        return memo[id(tensor)]

    def forward(
        self,
        hidden: Sequence[Chunk],
        calls: Sequence[Any],
        fn: Callable[[int, torch.Tensor, Any], torch.Tensor],
        store: bool,
    ) -> list[Chunk] | None:
        """``fn(index, hidden states, call)`` on each batch, brought to the execution device.

        ``hidden`` holds every batch's hidden states, ``calls`` each batch's call
        arguments (offloaded); calls that are the same object load once. With
        ``store`` the outputs come back to the offload device and are returned: this
        pass is then the last use of the inputs, so outputs go home into their inputs'
        buffers when they fit. On CUDA with a CPU cache, the next chunk loads and the
        last chunk's outputs return on copy streams while ``fn`` computes.
        """
        starts = list(itertools.accumulate((len(chunk) for chunk in hidden), initial=0))
        if len(calls) != starts[-1]:
            raise ValueError(f"{len(calls)} calls for {starts[-1]} batches of hidden states")
        compute = torch.cuda.current_stream(self.device) if self.loads is not None else None
        if self.loads is not None and self._offloaded:  # captured inputs may still be arriving
            self.loads.wait_stream(self.stores)
            self._offloaded = False
        outputs: list[Chunk] | None = [] if store else None
        on_device: dict[int, Any] = {}  # calls on the execution device, by id of the offloaded call
        memo: dict[int, torch.Tensor] = {}

        def load(index: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
            chunk, copies = hidden[index], []
            if compute is not None:
                if chunk.stored is not None:  # the last pass's outputs, maybe still arriving
                    self.loads.wait_event(chunk.stored)
                # behind the kernels launched so far: memory freed after they were queued
                # (the load stream's pool hands it out again) is theirs until they ran
                self._behind(self.loads, compute)
                torch.cuda.set_stream(self.loads)  # device buffers from the load stream's pool
            try:
                for call in calls[starts[index] : starts[index + 1]]:
                    if id(call) not in on_device:
                        on_device[id(call)] = map_tensors(call, lambda t: self._bring(t, memo, copies))
                if chunk.flat is not None and chunk.flat.device != self.device:
                    inputs = chunk.views(self._bring(chunk.flat[: chunk.size], {}, copies))
                else:
                    inputs = [self._bring(batch, {}, copies) for batch in chunk.batches]
                if not copies:
                    return inputs, None
                _copy(*map(list, zip(*copies, strict=True)), non_blocking=True)
            finally:
                if compute is not None:
                    torch.cuda.set_stream(compute)
            if chunk.loaded is None:
                chunk.loaded = torch.cuda.Event()
            chunk.loaded.record(self.loads)
            return inputs, chunk.loaded

        # the last chunk's outputs, which its store reads until the compute stream waits for it
        sending: tuple[list[torch.Tensor], torch.cuda.Event] | None = None
        pending = load(0) if hidden else None
        for index, chunk in enumerate(hidden):
            inputs, event = pending
            if index + 1 < len(hidden):
                pending = load(index + 1)
            if event is not None:
                compute.wait_event(event)
            outs = []
            for offset, batch_hidden in enumerate(inputs):
                batch = starts[index] + offset
                out = fn(batch, batch_hidden, on_device[id(calls[batch])])
                if sending is not None:  # the store ran while this batch computed
                    compute.wait_event(sending[1])
                    sending = None
                if outputs is not None:
                    outs.append(out)
            del inputs, batch_hidden
            if outputs is not None:
                kept = self._keep(chunk, outs, compute)
                outputs.append(kept)
                if kept.stored is not None:
                    sending = outs, kept.stored
        if sending is not None:  # the next pass starts without waiting for the last store
            for out in sending[0]:
                out.record_stream(self.stores)
        return outputs

    def _keep(
        self, chunk: Chunk, outs: list[torch.Tensor], compute: torch.cuda.Stream | None
    ) -> Chunk:
        """A chunk's outputs on the offload device: as they are when they are there already,
        else sent into the inputs' buffers when each fits its input's place (the pass was
        their last use), or into new ones."""
        if outs[0].device == self.offload:
            return Chunk(outs)
        pinned = self.stores is not None
        if chunk.flat is not None and all(
            out.shape == batch.shape and out.dtype == batch.dtype
            for out, batch in zip(outs, chunk.batches, strict=True)
        ):
            kept = chunk
        elif len({out.dtype for out in outs}) == 1:
            kept = Chunk.packed(outs, self.offload, pinned)
        else:
            kept = Chunk(
                [torch.empty_like(o, device=self.offload, pin_memory=pinned) for o in outs]
            )
        if self.stores is not None and kept.stored is None:
            kept.stored = torch.cuda.Event()
        self._send(kept.batches, outs, compute, record=False, event=kept.stored)
        return kept

    def synchronize(self) -> None:
        """Wait for every copy: outputs stored by :meth:`forward` are complete after this."""
        if self.stores is not None:
            self.stores.synchronize()
            self.loads.synchronize()

    def close(self) -> None:
        """Wait for every copy and release the pinned slabs (their tensors stay valid)."""
        self.synchronize()
        if self.slabs is not None:
            self.slabs.close()
