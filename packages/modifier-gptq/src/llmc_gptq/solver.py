"""The GPTQ solve for one weight matrix, given its Hessian.

Quantizes columns in order (or in activation order), spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian's
Cholesky factor, in blocks of ``block_size`` columns (lazy batch updates).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
    fake_quantize,
)
from compressed_tensors.quantization.utils import calculate_range

from llmc.quantization.observers import global_scale, observer_class, weight_qparams
from llmc_gptq import column_kernel as fused_loop

logger = logging.getLogger(__name__)

MAX_DAMPENING_RETRIES = 6
# a weight at least this fraction exactly zero was pruned (SparseGPT before GPTQ): its zeros stay
PRUNED_FRACTION = 0.05


@attrs.frozen
class GPTQResult:
    weight: torch.Tensor  # dequantized (fake-quantized) weight, original column order
    scale: torch.Tensor
    zero_point: torch.Tensor
    relative_error: float  # ||X(W - Q)||^2 / ||XW||^2 estimated through the Hessian
    dampening: float  # the dampening fraction that made the Hessian invertible


def _column_qparams(qparam: torch.Tensor, args: QuantizationArgs, rows: int, columns: torch.Tensor) -> torch.Tensor:
    """The (batch, rows, len(columns)) per-element view of a batch of scales or zero points
    (each shaped as ``weight_qparams`` returns it, stacked) for the given original column
    indices (batch, k), laid out by ``args``' strategy. Built one block at a time so the
    solve never holds a full-size copy."""
    strategy = args.strategy
    batch, n = columns.shape
    if strategy == QuantizationStrategy.TENSOR:
        return qparam.reshape(batch, 1, 1).expand(batch, rows, n)
    if strategy == QuantizationStrategy.CHANNEL:
        return qparam.reshape(batch, rows, 1).expand(batch, rows, n)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        index = (columns // args.group_size)[:, None, :].expand(batch, rows, n)
        return qparam.gather(2, index)
    if strategy == QuantizationStrategy.BLOCK:
        block_rows, block_cols = args.block_structure
        per_row = qparam.repeat_interleave(block_rows, dim=1)[:, :rows]
        return per_row.gather(2, (columns // block_cols)[:, None, :].expand(batch, rows, n))
    raise ValueError(f"GPTQ does not support the {strategy!r} weight strategy.")


class _ColumnQuantizer:
    """Fake-quantizes single columns (of every matrix of a batch) given their scales and zero
    points, and each matrix's global scale (batch, 1) for TENSOR_GROUP (NVFP4) schemes."""

    def __init__(self, args: QuantizationArgs, device: torch.device, global_scales: torch.Tensor | None = None):
        self.args = args
        self.is_int = args.type == QuantizationType.INT
        self.global_scales = global_scales
        if self.is_int:
            lo, hi = calculate_range(args, device)
            self.lo, self.hi = float(lo), float(hi)
        else:  # floats round to their own grid (FP8, FP4): compressed-tensors', one value per row
            self.channel_args = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None, "block_structure": None})

    def __call__(self, column: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.is_int:
            q = torch.clamp(torch.round(column / s) + z, self.lo, self.hi)
            return (q - z) * s
        per_row = None if self.global_scales is None else self.global_scales.expand(column.shape).reshape(-1, 1)
        flat = fake_quantize(column.reshape(-1, 1), s.reshape(-1, 1), z.reshape(-1, 1), self.channel_args, global_scale=per_row)
        return flat.reshape(column.shape)


def _column_loop(
    quantize_column: _ColumnQuantizer,
    W1: torch.Tensor,
    S1: torch.Tensor,
    Z1: torch.Tensor,
    Hinv1: torch.Tensor,
    Q1: torch.Tensor,
    Err1: torch.Tensor,
    pruned1: torch.Tensor | None = None,
) -> None:
    """Quantize one block's columns in order, updating the rest of the block (in place).

    Every tensor has a leading batch dimension: one matrix and its inverse Hessian factor
    per entry, all advanced by the same kernels. Entries of ``pruned1`` quantize to zero (their
    error spreads like any rounding error)."""
    for i in range(W1.shape[2]):
        w = W1[:, :, i]
        q = quantize_column(w, S1[:, :, i], Z1[:, :, i])
        if pruned1 is not None:
            q = q.masked_fill(pruned1[:, :, i], 0.0)
        Q1[:, :, i] = q
        err = (w - q) / Hinv1[:, i, i, None]
        W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, None, i, i:]
        Err1[:, :, i] = err


def inverse_cholesky(
    holder: list[torch.Tensor], dampening_frac: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper Cholesky factors of a batch of H^-1, retrying with more dampening the Hessians
    that are not positive definite.

    With J the order-reversing permutation and J H J = L L^T, H = (J L J)(J L J)^T, so
    U = (J L J)^-1 = J L^-1 J is upper triangular with U^T U = H^-1: one factorisation and
    one triangular inverse (two thirds of n^3 flops), where factorising H, inverting it
    through its factor and factorising the inverse cost twice as much, and never forming
    H^-1 keeps its squared condition number out of the factor.

    Returns the factors, the dampening fraction each used and the absolute amount added to
    each diagonal. Takes H out of ``holder`` (so this frame owns the only reference) and
    frees it once reversed: at most two and a half batches of its size are alive. One host
    sync per attempt.
    """
    K = holder.pop().flip(-2, -1)  # J H J; H itself is freed here
    diagonal = K.diagonal(dim1=-2, dim2=-1)
    mean_diag = diagonal.mean(dim=-1)
    unit = torch.where(mean_diag > 0, mean_diag, torch.ones_like(mean_diag))
    frac = torch.full_like(unit, dampening_frac)
    added = torch.zeros_like(unit)
    for attempt in range(MAX_DAMPENING_RETRIES + 1):
        diagonal.add_((frac * unit - added)[:, None])
        added = frac * unit
        lower, info = torch.linalg.cholesky_ex(K)
        failed = info != 0
        if not bool(failed.any()):
            del K, diagonal  # the view too, or K outlives the factorisation
            inverse = torch.empty_like(lower)
            _invert_lower(lower, inverse)
            del lower
            upper = inverse.flip(-2, -1)
            del inverse
            if bool(torch.isfinite(upper).all()):
                if attempt:
                    logger.warning(
                        "Hessian was ill-conditioned; solved with dampening_frac=%g", float(frac.max())
                    )
                return upper, frac, added
            raise RuntimeError("The inverse Hessian has no Cholesky factor; the layer's inputs are degenerate.")
        frac = torch.where(failed, frac.clamp(min=1e-4) * 10, frac)
    raise RuntimeError(
        f"The Hessian stayed singular up to dampening_frac={float(frac.max()) / 10:g}; the layer saw "
        "no usable calibration data. Use more calibration samples or ignore this module."
    )


# triangular blocks up to this order are inverted by one triangular solve against I
_DIRECT_INVERSE = 1024


def _invert_lower(L: torch.Tensor, out: torch.Tensor) -> None:
    """``out = L^-1`` for a batch of lower-triangular ``L``, by halves: the diagonal blocks
    recursively, the off-diagonal one as -C^-1 B A^-1 (two products), as LAPACK's trtri,
    which torch does not expose."""
    n = L.shape[-1]
    if n <= _DIRECT_INVERSE:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand(L.shape)
        out.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    h = n // 2
    _invert_lower(L[..., :h, :h], out[..., :h, :h])
    _invert_lower(L[..., h:, h:], out[..., h:, h:])
    out[..., :h, h:] = 0
    out[..., h:, :h] = -(out[..., h:, h:] @ (L[..., h:, :h] @ out[..., :h, :h]))


# rows per chunk of the whole-matrix reductions below: their temporaries stay small
_ROW_CHUNK = 4096


def quadratic_form(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """sum over rows of w H w^T, per matrix of the batch (= ||X W^T||^2), in row chunks.

    Only the relative error's denominator, a logged estimate: on CUDA the products run in
    bfloat16 on the tensor cores (float32 products of a 14336-wide Hessian took a tenth of
    the down projection's solve)."""
    total = torch.zeros(W.shape[0], device=W.device)
    low = W.is_cuda
    Hp = H.to(torch.bfloat16) if low else H
    for r in range(0, W.shape[1], _ROW_CHUNK):
        chunk = W[:, r : r + _ROW_CHUNK]
        if low:
            product = torch.bmm(chunk.to(torch.bfloat16), Hp, out_dtype=torch.float32)
        else:
            product = torch.bmm(chunk, Hp)
        total += torch.sum(product * chunk, dim=(1, 2))
    return total


def squared_distance(original: torch.Tensor, W: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """||original - W||^2 per matrix, dead columns of ``original`` taken as zero (as the solve
    did), in row chunks: no float32 copy of the original weights is kept through the solve."""
    total = torch.zeros(W.shape[0], device=W.device)
    for r in range(0, W.shape[1], _ROW_CHUNK):
        chunk = original[:, r : r + _ROW_CHUNK].float().masked_fill(dead[:, None, :], 0.0)
        total += torch.sum((chunk - W[:, r : r + _ROW_CHUNK]) ** 2, dim=(1, 2))
    return total


def _pruned_entries(W: torch.Tensor) -> torch.Tensor | None:
    """The zeros of the matrices at least :data:`PRUNED_FRACTION` zero (pruned before, e.g. 2:4
    by SparseGPT), to keep at zero; None when no matrix of the batch was pruned. A dense weight
    has next to no exact zeros, so its solve is unchanged."""
    zeros = W == 0
    pruned = zeros.flatten(1).float().mean(dim=1) >= PRUNED_FRACTION
    if not bool(pruned.any()):
        return None
    return zeros & pruned[:, None, None]


def _permute_in_place(H: torch.Tensor, order: torch.Tensor) -> None:
    """H[b] = H[b][order[b]][:, order[b]] for each matrix, through one matrix-sized temporary
    (gathering the batch whole holds three batches; broadcast index tensors cost more)."""
    for b in range(H.shape[0]):
        H[b].copy_(H[b].index_select(0, order[b]))
        H[b].copy_(H[b].index_select(1, order[b]))


def warm_up(
    device: torch.device, block_size: int, problems: Sequence[tuple[int, QuantizationArgs, torch.dtype]] = ()
) -> None:
    """Load and compile what the first solve would wait for, meant for a thread started while
    the first layer calibrates: the Triton column kernel, then one stand-in solve (zero
    weights, identity Hessian) per ``(input width, arguments, scale dtype)`` of ``problems``.
    Libraries load kernels lazily, chosen by size: stand-ins of 64 columns left the first
    real solve of an 8B layer a quarter of a second of loading. A failure is left for the
    solve itself to meet."""
    fused_loop.warm_up(device, block_size)
    try:
        for width, args, scale_dtype in problems:
            weight = torch.zeros(1, fused_loop.ROWS_PER_PROGRAM, width, device=device, dtype=torch.bfloat16)
            hessian = torch.eye(width, device=device)[None]
            gptq_quantize_batch(weight, [hessian], args, block_size=block_size, scale_dtype=scale_dtype,
                                actorder=args.actorder is not None)
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - see above
        return


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor | list[torch.Tensor], args: QuantizationArgs, **options: Any
) -> GPTQResult:
    """Quantize ``weight`` (out, in) minimising ||X W^T - X Q^T|| for inputs with Gram ``hessian``:
    :func:`gptq_quantize_batch` of one matrix, with the same ``options``.

    ``hessian`` given inside a one-element list is consumed: it is dampened and
    factorised in place and freed as soon as possible (for a Hessian nobody else
    needs, this halves the solve's peak memory). A bare tensor is left untouched.
    """
    batched = [hessian.pop()[None]] if isinstance(hessian, list) else hessian[None]
    return gptq_quantize_batch(weight[None], batched, args, **options)[0]


def gptq_quantize_batch(
    weights: torch.Tensor,
    hessians: torch.Tensor | list[torch.Tensor],
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: bool = False,
    scale_dtype: torch.dtype | None = None,
    column_kernel: bool = True,
    global_scales: torch.Tensor | None = None,
) -> list[GPTQResult]:
    """GPTQ of a batch of same-shaped weights (batch, out, in), each with its own Hessian
    (batch, in, in), in one solve: every kernel advances every matrix, so a hundred MoE
    experts cost about what one does.

    ``scale_dtype`` is the dtype the scale is stored in: the solve uses the stored
    (rounded) scale so that packing the result reproduces exactly its choices.
    ``hessians`` inside a one-element list is consumed, as in :func:`gptq_quantize`.
    ``column_kernel``: on CUDA, integer schemes, run each block's column loop as one Triton
    kernel (:mod:`llmc_gptq.column_kernel`) instead of a dozen small kernels per column.
    ``global_scales`` (batch, 1): each matrix's global scale under a TENSOR_GROUP (NVFP4)
    scheme, shared by a fused group (q/k/v); by default each matrix's own.
    """
    batch, rows, cols = weights.shape
    W = weights.detach().to(torch.float32, copy=True)
    pruned = _pruned_entries(W)
    if isinstance(hessians, list):
        H = hessians.pop().detach().float()
    else:
        H = hessians.detach().float().clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError("The Hessian holds NaN or infinite values; check the calibration data.")

    diagonal = H.diagonal(dim1=-2, dim2=-1)
    # the Hessian's diagonal is each input channel's sum of squares: the importance an
    # observer such as imatrix_mse weighs the weight's columns by
    importance = diagonal.clone() if observer_class(args, "weight").uses_importance else None
    dead = diagonal == 0
    diagonal.masked_fill_(dead, 1.0)
    W.masked_fill_(dead[:, None, :], 0.0)
    del diagonal  # a view keeps H alive: the factorisation below frees it

    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL) and importance is None:
        # rows are independent: one call for the whole batch
        scale, zero_point = weight_qparams(W.reshape(batch * rows, cols), args)
        scale, zero_point = scale.reshape(batch, rows, -1), zero_point.reshape(batch, rows, -1)
    else:
        if args.strategy == QuantizationStrategy.TENSOR_GROUP and global_scales is None:
            global_scales = torch.stack([global_scale(W[b], args) for b in range(batch)])
        if global_scales is not None:
            global_scales = global_scales.reshape(batch, 1).to(W.device, torch.float32)
        pairs = [
            weight_qparams(W[b], args, None if global_scales is None else global_scales[b],
                           None if importance is None else importance[b])
            for b in range(batch)
        ]
        scale, zero_point = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)
    scale_f, zero_f = scale.float(), zero_point.float()

    # ||X W||^2 now; ||X (W - Q)||^2 comes out of the solve itself (see below), so the raw
    # Hessian need not outlive its factorisation.
    denominator = quadratic_form(W, H)
    order = torch.arange(cols, device=W.device).expand(batch, cols)
    if actorder:
        order = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        W = W.gather(2, order[:, None, :].expand(batch, rows, cols))
        if pruned is not None:
            pruned = pruned.gather(2, order[:, None, :].expand(batch, rows, cols))
        _permute_in_place(H, order)
    quantize_column = _ColumnQuantizer(args, W.device, global_scales)

    holder = [H]
    del H
    Hinv, used_frac, damp = inverse_cholesky(holder, dampening_frac)
    # the Triton kernel has no pruned entries: a pruned weight takes the eager loop
    use_kernel = column_kernel and W.is_cuda and quantize_column.is_int and pruned is None and fused_loop.available()

    damped_error = torch.zeros(batch, device=W.device)  # sum of squared scaled errors, per matrix
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        S1 = _column_qparams(scale_f, args, rows, order[:, i1:i2])
        Z1 = _column_qparams(zero_f, args, rows, order[:, i1:i2])
        W1 = W[:, :, i1:i2]
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        if use_kernel:
            try:
                Q1, Err1 = fused_loop.column_loop(W1, S1, Z1, Hinv1, quantize_column.lo, quantize_column.hi)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile here: the eager loop
                logger.warning("The Triton column kernel failed (%s); solving with the eager loop.", exc)
                use_kernel = False
        if not use_kernel:
            W1 = W1.clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            _column_loop(quantize_column, W1, S1, Z1, Hinv1, Q1, Err1,
                         None if pruned is None else pruned[:, :, i1:i2])
        W[:, :, i1:i2] = Q1
        damped_error += torch.sum(Err1 * Err1, dim=(1, 2))
        if i2 < cols:
            W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    del Hinv

    if actorder:
        W = W.gather(2, torch.argsort(order, dim=-1)[:, None, :].expand(batch, rows, cols))
    # Each column's scaled error err = (w - q) / U_ii adds err^2 to ||X (W - Q)||^2 under the
    # dampened Hessian H + damp I; removing damp * ||W - Q||^2 gives the error under H itself.
    numerator = damped_error - damp * squared_distance(weights, W, dead)
    relative = torch.where(denominator > 0, numerator.clamp(min=0) / denominator, torch.zeros_like(numerator))
    relative_list, frac_list = relative.tolist(), used_frac.tolist()
    if not bool(torch.isfinite(W).all()) or any(math.isnan(r) for r in relative_list):
        raise RuntimeError("GPTQ produced non-finite weights.")
    W = W.to(weights.dtype)
    return [
        GPTQResult(
            weight=W[b],
            scale=scale[b],
            zero_point=zero_point[b],
            relative_error=relative_list[b],
            dampening=frac_list[b],
        )
        for b in range(batch)
    ]
