"""The GPTQ solve for one weight matrix, given its Hessian.

Quantizes columns in order (or in activation order), spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian's
Cholesky factor, in blocks of ``block_size`` columns (lazy batch updates).
"""

from __future__ import annotations

import logging
import math

import attrs
import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
    fake_quantize,
)
from compressed_tensors.quantization.utils import calculate_range

from llmc.quantization.observers import weight_qparams

logger = logging.getLogger(__name__)

MAX_DAMPENING_RETRIES = 6


@attrs.frozen
class GPTQResult:
    weight: torch.Tensor  # dequantized (fake-quantized) weight, original column order
    scale: torch.Tensor
    zero_point: torch.Tensor
    relative_error: float  # ||X(W - Q)||^2 / ||XW||^2 estimated through the Hessian
    dampening: float  # the dampening fraction that made the Hessian invertible


def _column_qparams(qparam: torch.Tensor, args: QuantizationArgs, rows: int, columns: torch.Tensor) -> torch.Tensor:
    """The (rows, len(columns)) per-element view of a scale or zero point for the given
    original column indices, laid out by ``args``' strategy. Built one block at a time so the
    solve never holds a full-size copy."""
    strategy = args.strategy
    n = columns.numel()
    if strategy == QuantizationStrategy.TENSOR:
        return qparam.reshape(1, 1).expand(rows, n)
    if strategy == QuantizationStrategy.CHANNEL:
        return qparam.reshape(rows, 1).expand(rows, n)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return qparam[:, columns // args.group_size]
    if strategy == QuantizationStrategy.BLOCK:
        block_rows, block_cols = args.block_structure
        return qparam.repeat_interleave(block_rows, dim=0)[:rows][:, columns // block_cols]
    raise ValueError(f"GPTQ does not support the {strategy!r} weight strategy.")


class _ColumnQuantizer:
    """Fake-quantizes single columns given that column's scale and zero point."""

    def __init__(self, args: QuantizationArgs, device: torch.device):
        self.args = args
        self.is_int = args.type == QuantizationType.INT
        self.key: tuple = (args.type, args.num_bits)
        if self.is_int:
            lo, hi = calculate_range(args, device)
            self.lo, self.hi = float(lo), float(hi)
        else:
            self.channel_args = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None, "block_structure": None})

    def __call__(self, column: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.is_int:
            q = torch.clamp(torch.round(column / s) + z, self.lo, self.hi)
            return (q - z) * s
        return fake_quantize(column[:, None], s[:, None], z[:, None], self.channel_args)[:, 0]


def _column_loop(
    quantize_column: _ColumnQuantizer,
    W1: torch.Tensor,
    S1: torch.Tensor,
    Z1: torch.Tensor,
    Hinv1: torch.Tensor,
    Q1: torch.Tensor,
    Err1: torch.Tensor,
) -> None:
    """Quantize one block's columns in order, updating the rest of the block (in place)."""
    for i in range(W1.shape[1]):
        w = W1[:, i]
        q = quantize_column(w, S1[:, i], Z1[:, i])
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err


class BlockGraphs:
    """CUDA graphs of :func:`_column_loop`, one per block shape.

    The loop launches a dozen tiny kernels per column; replaying it as one graph
    removes the launch overhead that otherwise dominates the solve. Reuse one
    instance across solves (a GPTQModifier keeps one) so each shape is captured once.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.disabled = False

    def run(self, quantize_column: _ColumnQuantizer, W1, S1, Z1, Hinv1) -> tuple[torch.Tensor, torch.Tensor]:
        key = (W1.shape, W1.device, quantize_column.key)
        if key not in self._graphs:
            static = [W1.clone(), S1.clone(), Z1.clone(), Hinv1.clone(), torch.zeros_like(W1), torch.zeros_like(W1)]
            side = torch.cuda.Stream(W1.device)
            side.wait_stream(torch.cuda.current_stream(W1.device))
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
                _column_loop(quantize_column, *[t.clone() for t in static])
            torch.cuda.current_stream(W1.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _column_loop(quantize_column, *static)
            self._graphs[key] = (graph, static)
        graph, static = self._graphs[key]
        for target, source in zip(static[:4], (W1, S1, Z1, Hinv1), strict=True):
            target.copy_(source)
        graph.replay()
        return static[4], static[5]


def _inverse_cholesky(holder: list[torch.Tensor], dampening_frac: float) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor of H^-1, retrying with more dampening if H is not positive definite.

    Returns the factor, the dampening fraction used and the absolute amount added to the diagonal.

    Takes H out of ``holder`` (so this frame owns the only reference), dampens it in place,
    and frees it as soon as its factor exists: at most two matrices of its size are alive.
    """
    H = holder.pop()
    mean_diag = torch.mean(torch.diag(H)).item()
    unit = mean_diag if mean_diag > 0 else 1.0
    frac, added = dampening_frac, 0.0
    for attempt in range(MAX_DAMPENING_RETRIES + 1):
        H.diagonal().add_(frac * unit - added)
        added = frac * unit
        lower, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            del H
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(upper).all():
                if attempt:
                    logger.warning("Hessian was ill-conditioned; solved with dampening_frac=%g", frac)
                return upper, frac, added
            raise RuntimeError("The inverse Hessian has no Cholesky factor; the layer's inputs are degenerate.")
        frac = max(frac, 1e-4) * 10
    raise RuntimeError(
        f"The Hessian stayed singular up to dampening_frac={frac / 10:g}; the layer saw no usable "
        "calibration data. Use more calibration samples or ignore this module."
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | list[torch.Tensor],
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: bool = False,
    scale_dtype: torch.dtype | None = None,
    graphs: BlockGraphs | None = None,
) -> GPTQResult:
    """Quantize ``weight`` (out, in) minimising ||X W^T - X Q^T|| for inputs with Gram ``hessian``.

    ``scale_dtype`` is the dtype the scale is stored in: the solve uses the stored
    (rounded) scale so that packing the result reproduces exactly its choices.

    ``hessian`` given inside a one-element list is consumed: it is dampened and
    factorised in place and freed as soon as possible (for a Hessian nobody else
    needs, this halves the solve's peak memory). A bare tensor is left untouched.
    """
    if args.strategy == QuantizationStrategy.TENSOR_GROUP or (
        args.type == QuantizationType.FLOAT and args.num_bits != 8
    ):
        raise ValueError("GPTQ supports integer and FP8 weight schemes; use QuantizationModifier for FP4.")
    rows, cols = weight.shape
    W = weight.detach().float().clone()
    if isinstance(hessian, list):
        H = hessian.pop().detach().float()
    else:
        H = hessian.detach().float().clone()
    if not torch.isfinite(H).all():
        raise ValueError("The Hessian holds NaN or infinite values; check the calibration data.")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale, zero_point = weight_qparams(W, args)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)
    scale_f, zero_f = scale.float(), zero_point.float()

    order = torch.arange(cols, device=W.device)
    if actorder:
        order = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, order], H[order][:, order]
    quantize_column = _ColumnQuantizer(args, W.device)

    W_original = W.clone()
    # ||X W||^2 now; ||X (W - Q)||^2 comes out of the solve itself (see below), so the raw
    # Hessian need not outlive its factorisation.
    denominator = torch.sum((W @ H) * W).item()
    holder = [H]
    del H
    Hinv, used_frac, damp = _inverse_cholesky(holder, dampening_frac)
    # Graphs replay fixed kernels: only for the integer path, whose kernels are all on-device.
    use_graphs = graphs is not None and W.is_cuda and quantize_column.is_int and not graphs.disabled

    damped_error = 0.0  # sum of squared scaled errors = ||X (W - Q)||^2 under the dampened H
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        S1 = _column_qparams(scale_f, args, rows, order[i1:i2])
        Z1 = _column_qparams(zero_f, args, rows, order[i1:i2])
        W1 = W[:, i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        if use_graphs:
            try:
                Q1, Err1 = graphs.run(quantize_column, W1, S1, Z1, Hinv1)
            except RuntimeError as exc:  # capture unsupported here: fall back for good
                logger.warning("CUDA graph capture failed (%s); solving without graphs.", exc)
                graphs.disabled = use_graphs = False
        if not use_graphs:
            W1 = W1.clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            _column_loop(quantize_column, W1, S1, Z1, Hinv1, Q1, Err1)
        W[:, i1:i2] = Q1
        damped_error += torch.sum(Err1 * Err1).item()
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    del Hinv

    if actorder:
        inverse_order = torch.argsort(order)
        W, W_original = W[:, inverse_order], W_original[:, inverse_order]
    # Each column's scaled error err = (w - q) / U_ii adds err^2 to ||X (W - Q)||^2 under the
    # dampened Hessian H + damp I; removing damp * ||W - Q||^2 gives the error under H itself.
    numerator = damped_error - damp * torch.sum((W_original - W) ** 2).item()
    relative = max(numerator, 0.0) / denominator if denominator > 0 else 0.0
    if not torch.isfinite(W).all() or math.isnan(relative):
        raise RuntimeError("GPTQ produced non-finite weights.")
    return GPTQResult(
        weight=W.to(weight.dtype),
        scale=scale,
        zero_point=zero_point,
        relative_error=relative,
        dampening=used_frac,
    )
