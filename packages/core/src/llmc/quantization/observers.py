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


def _block_min_max(weight: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each (rows, cols) block of an (R, C) weight; a ragged edge is zero-padded."""
    r, c = weight.shape
    pad_r, pad_c = math.ceil(r / rows) * rows - r, math.ceil(c / cols) * cols - c
    if pad_r or pad_c:  # zeros never widen a range that already contains 0
        weight = F.pad(weight, (0, pad_c, 0, pad_r))
    blocks = weight.unflatten(0, (-1, rows)).unflatten(2, (-1, cols))  # a view: no copy
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


def reduce_min_max(value: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``value`` over each quantization group of ``args``' strategy.

    ``value`` is a weight (out, in); the result has the shape of its scale, in
    float32. Min and max are exact in any dtype, so they are taken before the cast.
    """
    x = value.detach()
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(x)
        lo, hi = lo.reshape(1), hi.reshape(1)
    elif strategy == QuantizationStrategy.CHANNEL:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    elif strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        grouped = x.unflatten(-1, (-1, args.group_size))
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    elif strategy == QuantizationStrategy.BLOCK:
        lo, hi = _block_min_max(x, *args.block_structure)
    else:
        raise ValueError(f"Strategy {strategy!r} is not supported for weights.")
    return lo.float(), hi.float()


def global_scale(value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor | None:
    """The per-tensor global scale of TENSOR_GROUP (NVFP4) schemes, else None."""
    if args.strategy != QuantizationStrategy.TENSOR_GROUP:
        return None
    lo, hi = torch.aminmax(value.detach())
    return generate_gparam(lo.float(), hi.float())


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
        self.update_range(*torch.aminmax(value.detach().float()))

    def update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    @property
    def seen(self) -> bool:
        return self.min is not None
