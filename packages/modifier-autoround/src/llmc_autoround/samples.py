"""A decoder layer's captured calls, as samples that any subset of runs in one call.

The sequential pipeline calls a layer once per calibration batch. AutoRound draws its own
mini-batches of ``batch_size`` sequences from all of them, so the calls are split into
sequences (rows of the hidden states) and stacked: a tensor argument whose first dimension
is the batch's is per sequence, any other (rotary tables shared by the batch, cache
positions) is shared. Calls whose shapes or shared arguments differ land in separate
groups, each run as its own call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch

from llmc.api import map_tensors

Call = tuple[tuple, dict]


def _leaves(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(tree, lambda t: found.append(t) or t)
    return found


def _rebuild(tree: Any, leaves: list[torch.Tensor]) -> Any:
    it = iter(leaves)
    return map_tensors(tree, lambda _: next(it))


@attrs.define(eq=False)
class _Group:
    template: Call  # the first call, whose structure every member shares
    per_row: list[bool]  # for each tensor in it: one row per sequence?
    parts: list[list[torch.Tensor]]  # per tensor: the members' tensors, stacked on finish
    masks: list[torch.Tensor | None]  # per member call: its loss mask, if it has one that fits
    stacked: list[torch.Tensor] = attrs.field(factory=list)
    mask: torch.Tensor | None = None
    rows: int = 0

    def accepts(self, leaves: list[torch.Tensor], per_row: list[bool], rows: int) -> bool:
        """Whether a call can stack onto this group. In a one-sequence call a tensor whose first
        dimension is 1 may be either kind: it is taken as the group takes it."""
        if len(leaves) != len(self.parts):
            return False
        for tensor, row, group_row, part in zip(leaves, per_row, self.per_row, self.parts, strict=True):
            first = part[0]
            if rows == 1 and tensor.dim() >= 1 and tensor.shape[0] == 1:
                row = group_row
            if row != group_row or tensor.dtype != first.dtype or tensor.device != first.device:
                return False
            if row and tensor.shape[1:] != first.shape[1:]:
                return False
            if not row and tensor is not first and (tensor.shape != first.shape or not torch.equal(tensor, first)):
                return False
        return True

    def add(self, leaves: list[torch.Tensor], mask: torch.Tensor | None, rows: int) -> None:
        for part, tensor, row in zip(self.parts, leaves, self.per_row, strict=True):
            if row or not part:
                part.append(tensor)
        hidden = leaves[0]
        fits = mask is not None and tuple(mask.shape) == tuple(hidden.shape[:2])
        self.masks.append(mask.to(hidden.device) if fits else None)
        self.rows += rows

    def finish(self, masked: bool) -> None:
        """Stack the members; with ``masked`` (some call of the layer had a loss mask), their
        masks, every token of a call without one counting."""
        if masked:
            self.mask = torch.cat([
                m if m is not None else torch.ones(t.shape[:2], device=t.device)
                for m, t in zip(self.masks, self.parts[0], strict=True)
            ])
        self.stacked = [torch.cat(p) if row else p[0] for p, row in zip(self.parts, self.per_row, strict=True)]
        self.parts, self.masks = [], []

    def call(self, rows: torch.Tensor | None, hidden: torch.Tensor | None = None) -> Call:
        """The layer's arguments for these rows (all of them: None); ``hidden`` replaces the
        captured hidden states (the first argument) of every row."""
        leaves = list(self.stacked)
        if hidden is not None:
            leaves[0] = hidden
        if rows is not None:
            leaves = [t.index_select(0, rows) if row else t for t, row in zip(leaves, self.per_row, strict=True)]
        return _rebuild(self.template, leaves)

    def row_mask(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        if self.mask is None:
            return None
        return self.mask if rows is None else self.mask.index_select(0, rows)


class LayerSamples:
    """Sequences captured at one layer's input, drawn in any subset."""

    def __init__(self, calls: list[tuple[tuple, dict, torch.Tensor | None]]) -> None:
        self.groups: list[_Group] = []
        owner: list[tuple[int, int]] = []  # sample -> (group, row in it)
        for args, kwargs, mask in calls:
            leaves = _leaves((args, kwargs))
            rows = args[0].shape[0]
            per_row = [t.dim() >= 1 and t.shape[0] == rows for t in leaves]
            group = next((g for g in self.groups if g.accepts(leaves, per_row, rows)), None)
            if group is None:
                group = _Group((args, kwargs), per_row, [[] for _ in leaves], [])
                self.groups.append(group)
            index = self.groups.index(group)
            owner.extend((index, group.rows + r) for r in range(rows))
            group.add(leaves, mask, rows)
        masked = any(mask is not None for _, _, mask in calls)
        for group in self.groups:
            group.finish(masked)
        self._group = torch.tensor([g for g, _ in owner], dtype=torch.long)
        self._row = torch.tensor([r for _, r in owner], dtype=torch.long)

    def __len__(self) -> int:
        return len(self._row)

    def split(self, samples: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor | None]]:
        """(group, its rows) for a subset of samples (None: every sample, group by group)."""
        if samples is None:
            for index in range(len(self.groups)):
                yield index, None
            return
        groups, rows = self._group[samples], self._row[samples]
        for index in range(len(self.groups)):
            chosen = rows[groups == index]
            if len(chosen):
                device = self.groups[index].stacked[0].device
                yield index, chosen.to(device, non_blocking=True)

    def fits(self, hidden: list[torch.Tensor]) -> bool:
        """Whether ``hidden`` (per group, as :meth:`outputs` gives) can stand for the captured
        hidden states."""
        return len(hidden) == len(self.groups) and all(
            h.shape == g.stacked[0].shape for h, g in zip(hidden, self.groups, strict=True)
        )

    def outputs(
        self, run: Callable[[tuple, dict], torch.Tensor], batch_size: int, hidden: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``run``'s outputs for every sample, stacked per group, ``batch_size`` at a time; on
        ``hidden`` (see :meth:`fits`) in place of the captured hidden states if given."""
        results = []
        for index, group in enumerate(self.groups):
            pieces = []
            for start in range(0, group.rows, batch_size):
                rows = torch.arange(start, min(start + batch_size, group.rows), device=group.stacked[0].device)
                pieces.append(run(*group.call(rows, None if hidden is None else hidden[index])))
            results.append(torch.cat(pieces))
        return results

    def squared_error(
        self,
        samples: torch.Tensor | None,
        run: Callable[[tuple, dict], torch.Tensor],
        targets: list[torch.Tensor],
    ) -> torch.Tensor:
        """Mean squared error, in float32, of ``run`` on ``samples`` against ``targets`` (from
        :meth:`outputs`), over the tokens each sample's loss mask keeps."""
        total, count = None, 0
        for index, rows in self.split(samples):
            group = self.groups[index]
            out = run(*group.call(rows))
            target = targets[index] if rows is None else targets[index].index_select(0, rows)
            error = (out.float() - target.float()).pow(2)
            mask = group.row_mask(rows)
            if mask is not None and tuple(mask.shape) == tuple(error.shape[:-1]):
                error = error * mask.unsqueeze(-1)
                count += int(mask.sum()) * error.shape[-1]  # host sync: masked runs only
            else:
                count += error.numel()
            total = error.sum() if total is None else total + error.sum()
        assert total is not None
        return total / max(count, 1)
