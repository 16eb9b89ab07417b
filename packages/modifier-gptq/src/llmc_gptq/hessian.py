"""Hessians (X^T X of each Linear's inputs), accumulated once per distinct input.

Modules that receive the very same input tensor in a row — q/k/v, gate/up —
share one Hessian instead of accumulating the same product several times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in float32.

    On CUDA, half-precision activations go straight to the tensor cores with
    float32 accumulation (the inputs are already in that precision, so nothing is
    lost by not upcasting them first); elsewhere they are upcast.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    x = x.float()
    return x.t() @ x


class HessianAccumulator:
    """Forward pre-hooks that sum X^T X per distinct input, shared by modules that see it."""

    def __init__(self, observing: Callable[[], bool], offload: bool = False) -> None:
        self.observing = observing
        self.offload = offload
        self.hessians: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.owner: dict[torch.nn.Module, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last_input: torch.Tensor | None = None
        self._last_key: int | None = None

    def attach(self, module: torch.nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(self._hook))

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if not self.observing():
            return
        x = args[0]
        if x is self._last_input and self._last_key is not None:
            key = self._last_key  # same tensor as the module just before: share
        else:
            key = self.owner.get(module, id(module))
            product = gram(x)
            if self.offload:
                product = product.cpu()
            if key in self.hessians:
                self.hessians[key] += product
            else:
                self.hessians[key] = product
            self.tokens[key] = self.tokens.get(key, 0) + x.numel() // x.shape[-1]
            self._last_input, self._last_key = x, key
        previous = self.owner.setdefault(module, key)
        if previous != key:
            raise RuntimeError("A module's input sharing changed between batches; cannot share Hessians.")

    def end_batch(self) -> None:
        self._last_input = self._last_key = None

    def pop(self, module: torch.nn.Module) -> tuple[torch.Tensor, bool] | None:
        """The module's Hessian, and whether it is the last module to take it.

        The last one owns it (the accumulator forgets it), so the solve may consume it.
        """
        key = self.owner.pop(module, None)
        if key is None:
            return None
        hessian = self.hessians[key]
        last = key not in self.owner.values()
        if last:
            del self.hessians[key]
            del self.tokens[key]
        return hessian, last

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
