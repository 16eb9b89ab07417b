"""Signed gradient descent over a layer's rounding parameters, keeping the best iteration.

The loop never waits for the device: each iteration's loss is compared with the best so
far on the device, and the best parameters are kept there by selection, so the losses
reach the host once, at the end (AutoRound's reference reads every loss back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch


@attrs.define
class TuningResult:
    losses: list[float]  # the loss of each iteration's mini-batch, before its step
    best_iteration: int  # the iteration whose parameters were kept
    samples: int = 0  # sequences the layer was tuned on

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def best_loss(self) -> float:
        return self.losses[self.best_iteration]


class BatchSampler:
    """Mini-batches of ``batch_size`` sample indices, each epoch a fresh permutation
    (AutoRound draws its batches the same way); all samples when there are fewer."""

    def __init__(self, count: int, batch_size: int, seed: int = 0) -> None:
        self.count, self.batch_size = count, min(batch_size, count)
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor | None:
        if self.batch_size >= self.count:
            return None  # every sample, in order
        if len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.count, generator=self.generator)])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return batch


def signed_gradient_descent(
    loss: Callable[[int], torch.Tensor],
    offsets: Sequence[torch.Tensor],
    ranges: Sequence[torch.Tensor],
    iters: int,
    lr: float,
) -> tuple[list[torch.Tensor], TuningResult]:
    """Minimise ``loss(iteration)`` over ``offsets`` (rounding offsets) and ``ranges`` (range
    factors, kept in [0, 1]) by p -= lr_t * sign(grad), lr_t decaying linearly from ``lr``
    to 0 over ``iters`` iterations. Returns the parameters of the iteration with the lowest
    loss (as new tensors, in the order offsets then ranges) and every iteration's loss."""
    params = [*offsets, *ranges]
    for p in params:
        p.requires_grad_(True)
    best = [p.detach().clone() for p in params]
    best_loss = torch.full((), float("inf"), device=params[0].device)
    losses = []
    for iteration in range(iters):
        value = loss(iteration)
        value.backward()
        with torch.no_grad():
            value = value.detach()
            better = value < best_loss
            best_loss = torch.where(better, value, best_loss)
            for kept, p in zip(best, params, strict=True):
                torch.where(better, p, kept, out=kept)
            step = lr * (1.0 - iteration / iters)
            for p in params:
                if p.grad is not None:
                    p.sub_(p.grad.sign(), alpha=step)
                    p.grad = None
            for p in ranges:
                p.clamp_(0.0, 1.0)
        losses.append(value)
    for p in params:
        p.requires_grad_(False)
    history = torch.stack(losses).float().cpu()
    return best, TuningResult(losses=history.tolist(), best_iteration=int(torch.argmin(history)))
