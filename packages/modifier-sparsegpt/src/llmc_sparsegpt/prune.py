"""The SparseGPT solve (Frantar & Alistarh, 2023) for a batch of weight matrices.

Columns are pruned in order; each pruned weight's error is spread over the columns not yet
visited through the inverse Hessian's upper Cholesky factor, in blocks of ``block_size``
columns (lazy batch updates), exactly as GPTQ spreads rounding errors. Which weights go:

* unstructured (``prune_n == 0``): per block, the ``sparsity`` fraction of the block with the
  smallest saliency w^2 / [H^-1]_ii^2, chosen when the block starts;
* N:M (``prune_n:prune_m``, e.g. 2:4): in every group of M consecutive columns of a row, the N
  with the smallest saliency, chosen when the group's first column comes up (the group's
  weights have by then absorbed the errors of every column before it).

Every tensor has a leading batch dimension (same-shaped matrices, each with its own Hessian
and sparsity), so an MoE layer's experts prune in one solve.
"""

from __future__ import annotations

import math

import attrs
import torch

from llmc_gptq.solver import inverse_cholesky, quadratic_form, squared_distance


@attrs.frozen
class PruneResult:
    weight: torch.Tensor  # the pruned (and updated) weight, in the input's dtype
    sparsity: float  # the fraction of zeros it ends with
    relative_error: float  # ||X(W - P)||^2 / ||XW||^2, estimated through the Hessian


def parse_mask_structure(mask_structure: str) -> tuple[int, int]:
    """``"N:M"`` as (N, M); ``"0:0"`` (unstructured) as (0, 0)."""
    try:
        n, m = (int(part) for part in mask_structure.split(":"))
    except ValueError:
        raise ValueError(f"mask_structure must be 'N:M' (e.g. '2:4', or '0:0' for unstructured), got {mask_structure!r}.") from None
    if (n == 0) != (m == 0) or n < 0 or m < 0 or n > m:
        raise ValueError(f"mask_structure {mask_structure!r}: need 0 < N <= M (or '0:0' for unstructured).")
    return n, m


def _block_mask(
    W1: torch.Tensor, diag: torch.Tensor, sparsity: torch.Tensor, kept: torch.Tensor | None
) -> torch.Tensor:
    """The unstructured mask of one block: per matrix, every weight whose saliency is at most
    the one at rank ``sparsity × block size`` (ties included). Weights of ``kept`` (a mask to
    preserve) score zero, so they stay pruned; a block already sparser than asked keeps its
    mask as it is."""
    batch = W1.shape[0]
    score = W1.pow(2) / diag[:, None, :].pow(2)
    if kept is not None:
        score = score.masked_fill(kept, 0.0)
    flat = score.reshape(batch, -1)
    rank = (sparsity * flat.shape[1]).long().clamp(max=flat.shape[1] - 1)
    threshold = flat.sort(dim=1).values.gather(1, rank[:, None])
    mask = score <= threshold[:, :, None]
    if kept is not None:
        enough = kept.reshape(batch, -1).sum(dim=1) >= rank
        mask = torch.where(enough[:, None, None], kept, mask)
    return mask


def sparsegpt_prune_batch(
    weights: torch.Tensor,
    hessians: torch.Tensor | list[torch.Tensor],
    sparsity: float | torch.Tensor,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    preserve_sparsity_mask: bool = False,
) -> list[PruneResult]:
    """Prune a batch of same-shaped weights (batch, out, in), each with its own Hessian
    (batch, in, in) of its inputs, minimising ||X W^T - X P^T||.

    ``sparsity``: one fraction for all, or one per matrix (unstructured only; N:M sets it).
    ``hessians`` inside a one-element list is consumed (dampened and factorised in place).
    ``preserve_sparsity_mask``: weights that are zero already stay zero and errors are not
    spread onto them; more are pruned only where the target asks for more.
    """
    batch, rows, cols = weights.shape
    W = weights.detach().to(torch.float32, copy=True)
    H = hessians.pop().detach().float() if isinstance(hessians, list) else hessians.detach().float().clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError("The Hessian holds NaN or infinite values; check the calibration data.")
    # float64, as the rank sparsity × block size is truncated from it
    target = torch.as_tensor(sparsity, dtype=torch.float64, device=W.device).expand(batch)

    diagonal = H.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0  # inputs that never fired: their weights cannot matter
    diagonal.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    del diagonal

    kept = None
    if preserve_sparsity_mask:
        kept = W == 0
        already = kept.reshape(batch, -1).double().mean(dim=1)
        if prune_n == 0 and bool((already > target + 1e-6).any()):
            raise ValueError(
                f"The weight is already {float(already.max()):.1%} sparse, more than the target "
                f"{float(target.min()):.1%}; raise sparsity or set preserve_sparsity_mask=False."
            )

    denominator = quadratic_form(W, H)
    holder = [H]
    del H
    Hinv, _, damp = inverse_cholesky(holder, dampening_frac)

    damped_error = torch.zeros(batch, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, :, i1:i2].clone()
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        diag = Hinv1.diagonal(dim1=-2, dim2=-1)
        kept1 = None if kept is None else kept[:, :, i1:i2]
        if prune_n == 0:
            mask1 = _block_mask(W1, diag, target, kept1)
        else:
            mask1 = kept1.clone() if kept1 is not None else torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        zero = W1.new_zeros(())
        for i in range(i2 - i1):
            if prune_n and i % prune_m == 0:
                width = min(prune_m, i2 - i1 - i)
                score = W1[:, :, i : i + width].pow(2) / diag[:, None, i : i + width].pow(2)
                if kept1 is not None:
                    score = score.masked_fill(kept1[:, :, i : i + width], 0.0)
                smallest = torch.topk(score, min(prune_n, width), dim=-1, largest=False).indices
                mask1[:, :, i : i + width].scatter_(-1, smallest, True)
            # a pruned weight's error is all of it, a kept one's none: few kernels per column (the
            # loop runs once per input column, and on a GPU its launches set the time)
            err = torch.where(mask1[:, :, i], W1[:, :, i], zero).div_(Hinv1[:, i, i, None])
            W1[:, :, i:].baddbmm_(err[:, :, None], Hinv1[:, i : i + 1, i:], alpha=-1.0)
            Err1[:, :, i] = err
        W[:, :, i1:i2] = W1.masked_fill_(mask1, 0.0)  # kept weights as updated, pruned ones exactly zero
        damped_error += torch.sum(Err1 * Err1, dim=(1, 2))
        if i2 < cols:
            update = torch.bmm(Err1, Hinv[:, i1:i2, i2:])
            if kept is not None:
                update.masked_fill_(kept[:, :, i2:], 0.0)
            W[:, :, i2:] -= update
    del Hinv

    # each pruned weight's scaled error err = (w - 0) / U_ii adds err^2 to ||X (W - P)||^2 under
    # the dampened Hessian; removing damp * ||W - P||^2 leaves the error under H itself
    numerator = damped_error - damp * squared_distance(weights, W, dead)
    relative = torch.where(denominator > 0, numerator.clamp(min=0) / denominator, torch.zeros_like(numerator))
    zeros = (W == 0).reshape(batch, -1).float().mean(dim=1)
    relative_list, zeros_list = relative.tolist(), zeros.tolist()
    if not bool(torch.isfinite(W).all()) or any(math.isnan(r) for r in relative_list):
        raise RuntimeError("SparseGPT produced non-finite weights.")
    W = W.to(weights.dtype)
    return [PruneResult(W[b], zeros_list[b], relative_list[b]) for b in range(batch)]
