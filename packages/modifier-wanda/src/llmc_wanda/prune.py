"""Wanda's pruning rule (Sun et al., 2023): a weight's score is its magnitude times the L2 norm
of its input channel over the calibration tokens; each output row drops its lowest scores
(a ``sparsity`` fraction of the row, or N of every M consecutive weights). No weight is
updated."""

from __future__ import annotations

import torch


def wanda_prune(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """``weight`` (out, in) with its lowest-scoring weights set to zero, given each input
    channel's sum of squares ``input_sq_norms`` (in,); the same dtype as ``weight``."""
    W = weight.detach().float()
    score = W.abs() * input_sq_norms.float().sqrt()[None, :]
    mask = torch.zeros_like(W, dtype=torch.bool)
    if prune_n:
        cols = W.shape[1]
        for start in range(0, cols, prune_m):
            width = min(prune_m, cols - start)
            lowest = torch.topk(score[:, start : start + width], min(prune_n, width), dim=1, largest=False).indices
            mask[:, start : start + width].scatter_(1, lowest, True)
    else:
        count = int(W.shape[1] * sparsity)
        lowest = torch.sort(score, dim=1, stable=True).indices[:, :count]
        mask.scatter_(1, lowest, True)
    return W.masked_fill(mask, 0.0).to(weight.dtype)
