"""One weight's learnable rounding: AutoRound's offsets V and range scales, on the
compressed-tensors grid the scheme names.

The weight is quantized as compressed-tensors does it (``calculate_qparams`` on a range,
then ``round(w / scale + zero_point)`` clamped to the type's range), with two changes that
AutoRound learns: each element's value is offset by V in [-0.5, 0.5] before rounding, and
each group's range is the weight's own min and max shrunk by factors in [0, 1]. Rounding
passes gradients straight through, so both are trained by the layer's output error.
"""

from __future__ import annotations

from collections.abc import Callable

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
)


@attrs.define
class RoundingParams:
    """What AutoRound learns for one weight (float32)."""

    value: torch.Tensor  # offset added before rounding, shaped as the grouped weight
    min_scale: torch.Tensor  # factor on each group's minimum, shaped as the scale
    max_scale: torch.Tensor  # factor on each group's maximum

    def tensors(self) -> list[torch.Tensor]:
        return [self.value, self.min_scale, self.max_scale]


@attrs.define(eq=False)
class WeightRounding:
    """A weight (out, in) laid out by its quantization groups, with its unclipped range.

    ``scale_dtype`` is the dtype the checkpoint stores the scale in: the scale is rounded
    to it before rounding the weight, as the saved scale will be when packed.
    """

    args: QuantizationArgs
    shape: torch.Size
    dtype: torch.dtype
    scale_dtype: torch.dtype
    grouped: torch.Tensor  # (*scale shape, group size), float32
    low: torch.Tensor  # each group's minimum, shaped as the scale
    high: torch.Tensor
    global_scale: torch.Tensor | None = None  # NVFP4's per-tensor scale, fixed

    @classmethod
    def of(
        cls,
        weight: torch.Tensor,
        args: QuantizationArgs,
        scale_dtype: torch.dtype,
        global_scale: torch.Tensor | None = None,
    ) -> WeightRounding:
        if args.strategy not in SUPPORTED_STRATEGIES:
            raise ValueError(f"AutoRound rounds tensor, channel and group strategies, not {QuantizationStrategy(args.strategy).value}.")
        grouped = flatten_for_calibration(weight.detach().float(), "weight", args)[0]
        return cls(
            args=args,
            shape=weight.shape,
            dtype=weight.dtype,
            scale_dtype=scale_dtype,
            grouped=grouped,
            low=grouped.amin(dim=-1),
            high=grouped.amax(dim=-1),
            global_scale=None if global_scale is None else global_scale.float(),
        )

    def initial(self) -> RoundingParams:
        """V = 0 and the full range: round-to-nearest over the min-max range."""
        return RoundingParams(
            value=torch.zeros_like(self.grouped),
            min_scale=torch.ones_like(self.low),
            max_scale=torch.ones_like(self.high),
        )

    def qparams(self, params: RoundingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (rounded to its stored dtype, as float32) and zero point of the clipped range,
        by compressed-tensors' own rule; differentiable in the range scales."""
        scale, zero_point = calculate_qparams(
            self.low * params.min_scale, self.high * params.max_scale, self.args, global_scale=self.global_scale
        )
        return scale.to(self.scale_dtype).float(), zero_point

    def fake_quantize(
        self, params: RoundingParams, straight_through: bool = True, int_round_trip: RoundTrip | None = None
    ) -> torch.Tensor:
        """The weight quantized and dequantized with ``params``, in its own shape and dtype.
        ``straight_through``: rounding passes gradients to V and the range scales; without
        it, the exact values that packing the weight with :meth:`qparams` reproduces.
        ``int_round_trip``: :func:`int_round_trip` or a compiled form of it, for integer types."""
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
        return rounded.reshape(self.shape).to(self.dtype)


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
