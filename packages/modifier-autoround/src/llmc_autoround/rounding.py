"""One weight's learnable rounding: AutoRound's offsets V and range scales, on the
compressed-tensors grid the scheme names.

The weight is quantized as compressed-tensors does it (``calculate_qparams`` on a range,
then ``round(w / scale + zero_point)`` clamped to the type's range), with two changes that
AutoRound learns: each element's value is offset by V in [-0.5, 0.5] before rounding, and
each group's range is the weight's own min and max shrunk by factors in [0, 1]. Rounding
passes gradients straight through, so both are trained by the layer's output error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.quant_args import round_to_quantized_type_args
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

from llmc.api import flatten_for_calibration

SUPPORTED_STRATEGIES = (
    QuantizationStrategy.TENSOR,
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
    QuantizationStrategy.TENSOR_GROUP,
    QuantizationStrategy.BLOCK,
)


@attrs.define
class RoundingParams:
    """What AutoRound learns for a set of weights' groups (float32)."""

    value: torch.Tensor  # offset added before rounding, one per element: (groups, group length)
    min_scale: torch.Tensor  # factor on each group's minimum: (groups,)
    max_scale: torch.Tensor  # factor on each group's maximum

    def tensors(self) -> list[torch.Tensor]:
        return [self.value, self.min_scale, self.max_scale]


@attrs.frozen
class _Part:
    shape: torch.Size  # the weight's
    scale_shape: torch.Size  # its scale's (compressed-tensors' layout)
    start: int  # its rows (groups) in the stacked matrix
    stop: int
    block: tuple[int, int] | None = None  # the block strategy's (rows, columns): a group is a tile

    def weight(self, groups: torch.Tensor) -> torch.Tensor:
        """The weight laid out by its groups, back in its own shape (tiles put in place, the
        padding of ragged edges cut off)."""
        if self.block is None:
            return groups.reshape(self.shape)
        rows, cols = self.block
        tiles = groups.reshape(*self.scale_shape, rows, cols).transpose(1, 2)
        return tiles.reshape(self.scale_shape[0] * rows, self.scale_shape[1] * cols)[: self.shape[0], : self.shape[1]]


@attrs.define(eq=False)
class WeightRounding:
    """Weights (out, in) that share quantization arguments, each laid out by its groups, the
    groups of all of them stacked as the rows of one matrix with their unclipped ranges: a
    step rounds a whole layer with one chain of kernels, not one per weight.

    ``scale_dtype`` is the dtype the checkpoint stores the scales in: a scale is rounded to it
    before rounding the weight, as the saved scale will be when packed.
    """

    args: QuantizationArgs
    dtype: torch.dtype
    scale_dtype: torch.dtype
    grouped: torch.Tensor  # (groups, group length), float32
    low: torch.Tensor  # each group's minimum, (groups,)
    high: torch.Tensor
    global_scale: torch.Tensor | None  # NVFP4's per-tensor scales, fixed, one per group
    parts: list[_Part]

    @classmethod
    def of(
        cls,
        weights: Sequence[torch.Tensor],
        args: QuantizationArgs,
        scale_dtype: torch.dtype,
        global_scales: Sequence[torch.Tensor | None] | None = None,
    ) -> WeightRounding:
        """``weights`` of one dtype whose groups have one length (the same group size, or the
        same input size for channel strategies), with their NVFP4 global scales."""
        if args.strategy not in SUPPORTED_STRATEGIES:
            raise ValueError(f"AutoRound rounds tensor, channel, group and block strategies, not {QuantizationStrategy(args.strategy).value}.")
        global_scales = list(global_scales) if global_scales is not None else [None] * len(weights)
        rows, parts, gscales, start = [], [], [], 0
        for weight, gscale in zip(weights, global_scales, strict=True):
            grouped = flatten_for_calibration(weight.detach().float(), "weight", args)[0]
            flat = grouped.reshape(-1, grouped.shape[-1])
            block = tuple(args.block_structure) if args.strategy == QuantizationStrategy.BLOCK else None
            parts.append(_Part(weight.shape, grouped.shape[:-1], start, start + len(flat), block))
            start += len(flat)
            rows.append(flat)
            if gscale is not None:
                gscales.append(gscale.float().reshape(()).expand(len(flat)))
        grouped = torch.cat(rows)
        return cls(
            args=args,
            dtype=weights[0].dtype,
            scale_dtype=scale_dtype,
            grouped=grouped,
            low=grouped.amin(dim=-1),
            high=grouped.amax(dim=-1),
            global_scale=torch.cat(gscales) if gscales else None,
            parts=parts,
        )

    def initial(self) -> RoundingParams:
        """V = 0 and the full range: round-to-nearest over the min-max range."""
        return RoundingParams(
            value=torch.zeros_like(self.grouped),
            min_scale=torch.ones_like(self.low),
            max_scale=torch.ones_like(self.high),
        )

    def qparams(self, params: RoundingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (rounded to its stored dtype, as float32) and zero point of each group's
        clipped range, by compressed-tensors' own rule; differentiable in the range scales."""
        scale, zero_point = calculate_qparams(
            self.low * params.min_scale, self.high * params.max_scale, self.args, global_scale=self.global_scale
        )
        return scale.to(self.scale_dtype).float(), zero_point

    def split(self, stacked: torch.Tensor, qparams: bool = False) -> list[torch.Tensor]:
        """Each weight's part of ``stacked`` (groups first), in its own shape (its scale's
        shape with ``qparams``)."""
        return [
            stacked[p.start : p.stop].reshape(p.scale_shape) if qparams else p.weight(stacked[p.start : p.stop])
            for p in self.parts
        ]

    def fake_quantize(
        self, params: RoundingParams, straight_through: bool = True, int_round_trip: RoundTrip | None = None
    ) -> list[torch.Tensor]:
        """The weights quantized and dequantized with ``params``, each in its own shape and
        the weights' dtype. ``straight_through``: rounding passes gradients to V and the range
        scales; without it, the exact values that packing the weights with :meth:`qparams`
        reproduces. ``int_round_trip``: :func:`int_round_trip_eager` or a compiled form of it,
        for integer types."""
        scale, zero_point = self.qparams(params)
        step = scale if self.global_scale is None else scale / self.global_scale
        step, zero = step.unsqueeze(-1), zero_point.unsqueeze(-1).float()
        q_min, q_max = calculate_range(self.args, self.grouped.device)
        if self.args.type == QuantizationType.INT:
            rounded = (int_round_trip or int_round_trip_eager)(self.grouped, params.value, step, zero, q_min, q_max, straight_through)
        else:  # compressed-tensors' FP4/FP8 rounding (a Triton kernel on GPUs)
            scaled = torch.clamp(self.grouped / step + params.value + zero, q_min, q_max)
            rounded = round_to_quantized_type_args(scaled.detach(), self.args, q_min, q_max)
            if straight_through:
                rounded = scaled + (rounded - scaled.detach())
            rounded = (rounded - zero) * step
        return self.split(rounded.to(self.dtype))


RoundTrip = Callable[..., torch.Tensor]


def int_round_trip_eager(
    grouped: torch.Tensor,
    value: torch.Tensor,
    step: torch.Tensor,
    zero: torch.Tensor,
    q_min: torch.Tensor,
    q_max: torch.Tensor,
    straight_through: bool,
) -> torch.Tensor:
    """Offset, round onto the integer grid and dequantize, as compressed-tensors rounds
    (``round(clamp(w / step + zero))``); elementwise only, so ``torch.compile`` fuses it."""
    scaled = torch.clamp(grouped / step + value + zero, q_min, q_max)
    rounded = torch.round(scaled.detach())
    if straight_through:
        rounded = scaled + (rounded - scaled.detach())
    return (rounded - zero) * step
