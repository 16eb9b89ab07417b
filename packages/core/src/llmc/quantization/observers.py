"""Min-max observers: quantization parameters from weights and observed activations.

compressed-tensors owns the arithmetic (``calculate_qparams``, ``generate_gparam``);
this module only reduces a tensor to the min/max that each strategy needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam


def _block_view(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(R, C) -> (R/rows, C/cols, rows*cols), zero-padding a ragged last block."""
    r, c = weight.shape
    pad_r, pad_c = math.ceil(r / rows) * rows - r, math.ceil(c / cols) * cols - c
    if pad_r or pad_c:  # zeros never widen a range that already contains 0
        weight = F.pad(weight, (0, pad_c, 0, pad_r))
    nr, nc = weight.shape[0] // rows, weight.shape[1] // cols
    return weight.reshape(nr, rows, nc, cols).transpose(1, 2).reshape(nr, nc, rows * cols)


def reduce_min_max(value: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``value`` over each quantization group of ``args``' strategy.

    ``value`` is a weight (out, in); the result has the shape of its scale.
    """
    x = value.float()
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(x)
        return lo.reshape(1), hi.reshape(1)
    if strategy == QuantizationStrategy.CHANNEL:
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        grouped = x.unflatten(-1, (-1, args.group_size))
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    if strategy == QuantizationStrategy.BLOCK:
        rows, cols = args.block_structure
        blocks = _block_view(x, rows, cols)
        return blocks.amin(dim=-1), blocks.amax(dim=-1)
    raise ValueError(f"Strategy {strategy!r} is not supported for weights.")


def global_scale(value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor | None:
    """The per-tensor global scale of TENSOR_GROUP (NVFP4) schemes, else None."""
    if args.strategy != QuantizationStrategy.TENSOR_GROUP:
        return None
    lo, hi = torch.aminmax(value.float())
    return generate_gparam(lo, hi)


def weight_qparams(
    weight: torch.Tensor, args: QuantizationArgs, gscale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``weight`` under ``args`` (round-to-nearest min-max)."""
    lo, hi = reduce_min_max(weight, args)
    return calculate_qparams(lo, hi, args, global_scale=gscale)


class MinMaxObserver:
    """Running min/max of an activation over every calibration batch.

    Static activation schemes are per-tensor (FP8, INT8) or need a per-tensor
    global scale (NVFP4); both reduce to one running min and max.
    """

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, value: torch.Tensor) -> None:
        lo, hi = torch.aminmax(value.detach().float())
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    @property
    def seen(self) -> bool:
        return self.min is not None
