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


def _expand(qparam: torch.Tensor, args: QuantizationArgs, rows: int, cols: int) -> torch.Tensor:
    """Per-element view (rows, cols) of a scale or zero point laid out for ``args``' strategy."""
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        return qparam.reshape(1, 1).expand(rows, cols)
    if strategy == QuantizationStrategy.CHANNEL:
        return qparam.reshape(rows, 1).expand(rows, cols)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return qparam.repeat_interleave(args.group_size, dim=1)[:, :cols]
    if strategy == QuantizationStrategy.BLOCK:
        br, bc = args.block_structure
        return qparam.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]
    raise ValueError(f"GPTQ does not support the {strategy!r} weight strategy.")


class _ColumnQuantizer:
    """Fake-quantizes single columns with precomputed per-element scales."""

    def __init__(self, args: QuantizationArgs, scale: torch.Tensor, zero: torch.Tensor):
        self.args = args
        self.scale = scale
        self.zero = zero
        self.is_int = args.type == QuantizationType.INT
        if self.is_int:
            lo, hi = calculate_range(args, scale.device)
            self.lo, self.hi = float(lo), float(hi)
        else:
            self.channel_args = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None, "block_structure": None})

    def __call__(self, column: torch.Tensor, index: int) -> torch.Tensor:
        s, z = self.scale[:, index], self.zero[:, index]
        if self.is_int:
            q = torch.clamp(torch.round(column / s) + z, self.lo, self.hi)
            return (q - z) * s
        return fake_quantize(column[:, None], s[:, None], z[:, None], self.channel_args)[:, 0]


def _inverse_cholesky(hessian: torch.Tensor, dampening_frac: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1, retrying with more dampening if H is not positive definite."""
    mean_diag = torch.mean(torch.diag(hessian)).item()
    frac = dampening_frac
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(MAX_DAMPENING_RETRIES + 1):
        damped = hessian + eye * (frac * mean_diag if mean_diag > 0 else 1.0)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if attempt:
                    logger.warning("Hessian was ill-conditioned; solved with dampening_frac=%g", frac)
                return upper, frac
        frac = max(frac, 1e-4) * 10
    raise RuntimeError(
        f"The Hessian stayed singular up to dampening_frac={frac / 10:g}; the layer saw no usable "
        "calibration data. Use more calibration samples or ignore this module."
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """Quantize ``weight`` (out, in) minimising ||X W^T - X Q^T|| for inputs with Gram ``hessian``.

    ``scale_dtype`` is the dtype the scale is stored in: the solve uses the stored
    (rounded) scale so that packing the result reproduces exactly its choices.
    """
    if args.strategy == QuantizationStrategy.TENSOR_GROUP or (
        args.type == QuantizationType.FLOAT and args.num_bits != 8
    ):
        raise ValueError("GPTQ supports integer and FP8 weight schemes; use QuantizationModifier for FP4.")
    rows, cols = weight.shape
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    if not torch.isfinite(H).all():
        raise ValueError("The Hessian holds NaN or infinite values; check the calibration data.")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale, zero_point = weight_qparams(W, args)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)
    full_scale = _expand(scale.float(), args, rows, cols)
    full_zero = _expand(zero_point.float(), args, rows, cols)

    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        full_scale, full_zero = full_scale[:, perm], full_zero[:, perm]
    quantize_column = _ColumnQuantizer(args, full_scale.contiguous(), full_zero.contiguous())

    H_for_error = H.clone()
    W_original = W.clone()
    Hinv, used_frac = _inverse_cholesky(H, dampening_frac)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_column(w, i1 + i)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    delta = W_original - W
    denominator = torch.sum((W_original @ H_for_error) * W_original).item()
    relative = torch.sum((delta @ H_for_error) * delta).item() / denominator if denominator > 0 else 0.0

    if perm is not None:
        W = W[:, torch.argsort(perm)]
    if not torch.isfinite(W).all() or math.isnan(relative):
        raise RuntimeError("GPTQ produced non-finite weights.")
    return GPTQResult(
        weight=W.to(weight.dtype),
        scale=scale,
        zero_point=zero_point,
        relative_error=relative,
        dampening=used_frac,
    )
