"""Outputs one sequential target hands a later one beside the hidden states.

GLM-5's decoder layers return ``(hidden states, indexer picks)`` and the model passes the picks
to the next layer (``prev_topk_indices``). The capture cannot know them (no layer runs), so a
recorder returns placeholders (:class:`Carried`) in their places, the model passes those on into
the later targets' calls, and :class:`Carry` fills them in, batch by batch, with the outputs the
target produced when the pipeline ran it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from llmc.tensors import map_tensors


@dataclasses.dataclass(frozen=True)
class Carried:
    """Output ``position`` of target ``index``, in the calls of the targets the model handed it to."""

    index: int
    position: int


@functools.cache
def declared_outputs(cls: type) -> int:
    """How many outputs a target class's ``forward`` declares (its ``tuple[...]`` return
    annotation), 1 when it declares one tensor or nothing."""
    annotation = inspect.signature(cls.forward).return_annotation
    text = (annotation if isinstance(annotation, str) else str(annotation)).replace(" ", "")
    if not text.startswith("tuple[") or "..." in text:
        return 1
    depth, count = 0, 1
    for char in text[len("tuple[") : -1]:
        depth += char == "["
        depth -= char == "]"
        count += char == "," and depth == 0
    return count


def handed_back(index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> Any:
    """What a recorder returns for target ``index``: its input hidden states, with placeholders
    for the other outputs its class declares."""
    count = declared_outputs(type(layer))
    return hidden if count == 1 else (hidden, *(Carried(index, k) for k in range(1, count)))


def received(hidden: Any, handed: torch.Tensor | None) -> Any:
    """A target's hidden states as the model passed them: a model that passes a declared tuple
    on whole (Llama 4's layers declare one and return a tensor) gets its first element taken."""
    if isinstance(hidden, tuple) and hidden and handed is not None and hidden[0] is handed:
        return hidden[0]
    return hidden


def _placeholders(value: Any) -> Iterable[Carried]:
    if isinstance(value, Carried):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _placeholders(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _placeholders(v)


class Carry:
    """Each target's extra outputs per batch, from the last pass over it, on ``offload``, until
    the last target whose calls name them has run."""

    def __init__(self, offload: torch.device) -> None:
        self.offload = offload
        self._kept: dict[tuple[int, int], dict[int, Any]] = {}
        self._readers: dict[tuple[int, int], int] | None = None  # None: not known yet, keep all

    def read_by(self, calls: Iterable[Iterable[Any]]) -> None:
        """Learn, from every batch's recorded calls (target by target), which outputs later
        targets read and which target reads each last; what none reads is dropped."""
        readers: dict[tuple[int, int], int] = {}
        seen: set[int] = set()
        for batch in calls:
            for reader, call in enumerate(batch):
                if id(call) in seen:
                    continue
                seen.add(id(call))
                for carried in _placeholders(tuple(call)):
                    key = (carried.index, carried.position)
                    readers[key] = max(readers.get(key, reader), reader)
        self._readers = readers
        for key in [k for k in self._kept if k not in readers]:
            del self._kept[key]

    def __bool__(self) -> bool:
        return bool(self._readers)

    def keep(self, index: int, batch: int, outputs: tuple | list) -> None:
        for position in range(1, len(outputs)):
            key = (index, position)
            if self._readers is None or key in self._readers:
                self._kept.setdefault(key, {})[batch] = map_tensors(
                    outputs[position], lambda t: t.detach().to(self.offload)
                )

    def fill(self, value: Any, batch: int, device: torch.device) -> Any:
        """``value`` (a call's arguments) with each placeholder replaced by its output for ``batch``."""
        if isinstance(value, Carried):
            try:
                kept = self._kept[(value.index, value.position)][batch]
            except KeyError:
                raise RuntimeError(
                    f"Output {value.position} of sequential target {value.index} on batch {batch} is not "
                    "known: a resumed run does not keep the outputs targets hand each other; run again "
                    "with resume=False."
                ) from None
            return map_tensors(kept, lambda t: t.to(device))
        if isinstance(value, tuple):
            return type(value)(*(self.fill(v, batch, device) for v in value)) if hasattr(value, "_fields") else tuple(
                self.fill(v, batch, device) for v in value
            )
        if isinstance(value, list):
            return [self.fill(v, batch, device) for v in value]
        if isinstance(value, dict):
            return {k: self.fill(v, batch, device) for k, v in value.items()}
        return value

    def done(self, index: int) -> None:
        """Target ``index`` ran its last pass: drop what no later target reads."""
        if self._readers is not None:
            for key in [k for k, last in self._readers.items() if last <= index]:
                self._kept.pop(key, None)
