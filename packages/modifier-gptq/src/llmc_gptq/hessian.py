"""Hessians (X^T X of each Linear's inputs), accumulated once per distinct input.

Modules that receive the very same input tensor in a row — q/k/v, gate/up —
share one Hessian instead of accumulating the same product several times.
Inputs that are slices of one batched tensor (each MoE expert's down projection
reading its row of the experts' stacked activations) are multiplied in one
batched product when the batch ends, not one small product each.

Wide Hessians accumulate their upper triangle only (:func:`llmc.linalg.add_gram`)
and are mirrored once when taken. On CUDA, batches' tokens are staged until a
product has ``STAGE_TOKENS`` of them: each product then reads and writes the
float32 Hessian once per four 2048-token batches instead of once per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmc import distributed
from llmc.linalg import add_gram, gram, mirror_upper
from llmc.observing import input_only

# tokens per Hessian product on CUDA (four 2048-token batches)
STAGE_TOKENS = 8192


def batched_gram(xs: list[torch.Tensor]) -> torch.Tensor:
    """:func:`gram` of each of several same-shaped inputs, (len(xs), in, in), in one product
    (upcast first: products of half-precision values are exact in float32, as in :func:`gram`)."""
    x = torch.stack([t.reshape(-1, t.shape[-1]) for t in xs]).float()
    return torch.bmm(x.transpose(1, 2), x)


def _slice_of_batch(x: torch.Tensor) -> bool:
    """An input that is one entry of a batched tensor (``stacked[i]``)."""
    base = x._base
    return base is not None and base.ndim == x.ndim + 1 and base.shape[1:] == x.shape


class HessianAccumulator:
    """Forward pre-hooks that sum X^T X per distinct input, shared by modules that see it."""

    def __init__(self, observing: Callable[[], bool], offload: bool = False) -> None:
        self.observing = observing
        self.offload = offload
        self.hessians: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.owner: dict[torch.nn.Module, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: list[tuple[int, torch.Tensor]] = []  # slices of one batched tensor, deferred
        self._staged: dict[int, tuple[torch.Tensor, int]] = {}  # CUDA: tokens not yet multiplied, count
        self._last_input: torch.Tensor | None = None
        self._last_key: int | None = None

    def attach(self, module: torch.nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(self._hook))

    @input_only
    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if not self.observing():
            return
        x = args[0]
        if x is self._last_input and self._last_key is not None:
            key = self._last_key  # same tensor as the module just before: share
        else:
            key = self.owner.get(module, id(module))
            if _slice_of_batch(x):
                if self._pending and self._pending[0][1]._base is not x._base:
                    self._flush()
                self._pending.append((key, x))
            elif self.offload:
                self._add(key, gram(x))
            else:
                self._stage(key, x.reshape(-1, x.shape[-1]))
            self.tokens[key] = self.tokens.get(key, 0) + x.numel() // x.shape[-1]
            self._last_input, self._last_key = x, key
        previous = self.owner.setdefault(module, key)
        if previous != key:
            raise RuntimeError("A module's input sharing changed between batches; cannot share Hessians.")

    def _stage(self, key: int, rows: torch.Tensor) -> None:
        """Add ``rows`` (tokens, features) to the key's Hessian, through its staging buffer on
        CUDA (one product per :data:`STAGE_TOKENS` tokens)."""
        n = rows.shape[-1]
        if key not in self.hessians:
            self.hessians[key] = torch.zeros(n, n, device=rows.device)
        if not rows.is_cuda or rows.shape[0] >= STAGE_TOKENS:
            add_gram(self.hessians[key], rows)
            return
        buffer, filled = self._staged.get(key, (None, 0))
        if buffer is None or buffer.dtype != rows.dtype:
            self._unstage(key)
            buffer, filled = torch.empty(STAGE_TOKENS, n, dtype=rows.dtype, device=rows.device), 0
        elif filled + rows.shape[0] > STAGE_TOKENS:
            add_gram(self.hessians[key], buffer[:filled])
            filled = 0
        buffer[filled : filled + rows.shape[0]].copy_(rows)
        self._staged[key] = (buffer, filled + rows.shape[0])

    def _unstage(self, key: int | None = None) -> None:
        """Multiply the staged tokens of ``key`` (of every key: None) and free the buffers."""
        for k in list(self._staged) if key is None else [key]:
            staged = self._staged.pop(k, None)
            if staged is not None and staged[1]:
                add_gram(self.hessians[k], staged[0][: staged[1]])

    def _add(self, key: int, product: torch.Tensor) -> None:
        if self.offload:
            product = product.cpu()
        if key in self.hessians:
            self.hessians[key] += product
        else:
            self.hessians[key] = product

    def _flush(self) -> None:
        """Accumulate the deferred slices of one batched tensor in one product."""
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            self._add(pending[0][0], gram(pending[0][1]))
        elif pending:
            for (key, _), product in zip(pending, batched_gram([x for _, x in pending]), strict=True):
                self._add(key, product.clone() if key not in self.hessians else product)

    def end_batch(self) -> None:
        self._flush()
        self._last_input = self._last_key = None

    def pop(self, module: torch.nn.Module) -> tuple[torch.Tensor, bool] | None:
        """The module's Hessian, and whether it is the last module to take it.

        The last one owns it (the accumulator forgets it), so the solve may consume it.
        """
        self._flush()
        key = self.owner.pop(module, None)
        if key is None:
            return None
        self._unstage(key)
        hessian = mirror_upper(self.hessians[key])
        last = key not in self.owner.values()
        if last:
            del self.hessians[key]
            del self.tokens[key]
        return hessian, last

    def synchronize(self, modules: list[torch.nn.Module]) -> None:
        """Sum the ranks' Hessians of ``modules`` (a distributed run; the same list, in the
        same order, on every rank), so each rank holds the whole calibration set's.

        The ranks first agree on which modules share a Hessian (a module no token of this
        rank's share reached, an MoE expert, has none here: it joins with zeros); then each
        shared Hessian is summed once, in list order."""
        self._flush()
        self._unstage()
        leaders: dict[int, int] = {}
        local = []
        for i, module in enumerate(modules):
            key = self.owner.get(module)
            local.append(-1 if key is None else leaders.setdefault(key, i))
        agreed = []
        for i, seen in enumerate(zip(*distributed.all_gather_object(local), strict=True)):
            groups = {g for g in seen if g >= 0}
            if len(groups) > 1:
                raise RuntimeError(f"The ranks disagree on which modules share module {i}'s Hessian; cannot sum them.")
            agreed.append(groups.pop() if groups else -1)
        for i, leader in enumerate(agreed):
            if leader != i:
                continue
            module = modules[i]
            key = self.owner.get(module)
            if key is None:
                key = id(module)
                columns = module.weight.shape[1]
                device = "cpu" if self.offload else module.weight.device
                self.hessians[key] = torch.zeros(columns, columns, device=device)
                self.tokens[key] = 0
            distributed.all_reduce(self.hessians[key])
            for j, group in enumerate(agreed):
                if group == i:
                    self.owner[modules[j]] = key

    def shared_groups(self) -> list[list[torch.nn.Module]]:
        groups: dict[int, list[torch.nn.Module]] = {}
        for module, key in self.owner.items():
            groups.setdefault(key, []).append(module)
        return list(groups.values())

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_batch()
        self._staged.clear()
