"""Observers: the range (min, max) each quantization group is given.

An observer turns what it sees of a value (a weight once, an activation once per
calibration batch) into the min and max that compressed-tensors' own arithmetic
(``calculate_qparams``, ``generate_gparam``) makes scales and zero points of.
Observers are plugins: a class registered by name through
``llmc_register_observers`` and chosen by a quantization argument's ``observer``
field, or by a modifier's ``weight_observer`` / ``input_observer`` /
``output_observer`` / ``observer`` (llm-compressor's names and defaults: weights
``memoryless_minmax``, activations and the KV cache ``minmax``, a moving average).

Every value is first flattened as llm-compressor does, to
``(observations, *qparam_shape, group_size)``: an observer reduces dimensions 0
and -1 and keeps the shape of the scale it feeds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

# What a quantization argument's ``observer`` names for weights, where llm-compressor
# swaps an accumulating observer for its memoryless twin (a weight is seen once).
_WEIGHT_OBSERVERS = {
    None: "memoryless_minmax",
    "minmax": "memoryless_minmax",
    "static_minmax": "memoryless_minmax",
    "mse": "memoryless_mse",
}
DEFAULT_ACTIVATION_OBSERVER = "minmax"


_T = QuantizationStrategy
# The strategies a value can be observed under: static activations are per tensor (or
# per tensor with groups under a global scale, NVFP4); attention states per tensor or head.
OBSERVABLE: dict[str, tuple[QuantizationStrategy, ...]] = {
    "weight": (_T.TENSOR, _T.CHANNEL, _T.GROUP, _T.TENSOR_GROUP, _T.BLOCK),
    "input": (_T.TENSOR, _T.TENSOR_GROUP),
    "output": (_T.TENSOR, _T.TENSOR_GROUP),
    "q": (_T.TENSOR, _T.ATTN_HEAD),
    "k": (_T.TENSOR, _T.ATTN_HEAD),
    "v": (_T.TENSOR, _T.ATTN_HEAD),
}


def check_observable(base: str, args: QuantizationArgs) -> None:
    """Refuse, before any work, a strategy no observer can calibrate ``base`` under."""
    allowed = OBSERVABLE.get(base)
    if allowed is None:
        raise ValueError(f"Unknown quantized value {base!r}; expected one of {', '.join(OBSERVABLE)}.")
    if args.strategy not in allowed:
        kind = "weights" if base == "weight" else f"static {base} quantization"
        raise ValueError(
            f"Strategy {QuantizationStrategy(args.strategy).value!r} is not supported for {kind}; use one of "
            f"{', '.join(s.value for s in allowed)}"
            + ("" if base == "weight" else ", or dynamic quantization") + "."
        )


def flatten_for_calibration(value: torch.Tensor, base: str, args: QuantizationArgs) -> torch.Tensor:
    """``value`` as ``(observations, *qparam_shape, group_size)`` for its role ``base``:
    ``weight`` (out, in); ``input``/``output`` (..., features); ``q``/``k``/``v``
    attention states (batch, heads, tokens, head_dim)."""
    check_observable(base, args)
    strategy = args.strategy
    grouped = strategy in (_T.GROUP, _T.TENSOR_GROUP)
    if base == "weight":
        if strategy == _T.TENSOR:
            return value.reshape(1, 1, -1)
        if strategy == _T.CHANNEL:
            return value.unsqueeze(-2).unsqueeze(0)
        if grouped:
            return value.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
        rows, cols = args.block_structure
        r, c = value.shape
        # zeros never widen a range that already contains 0: a ragged edge is padded
        value = F.pad(value, (0, -c % cols, 0, -r % rows))
        blocks = value.unflatten(0, (-1, rows)).unflatten(2, (-1, cols))
        return blocks.transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    if base in ("input", "output"):
        if strategy == _T.TENSOR:
            return value.reshape(-1, 1, value.shape[-1])
        return value.reshape(-1, value.shape[-1]).unflatten(-1, (-1, args.group_size))
    states = value.transpose(1, 2).flatten(0, 1)  # (batch * tokens, heads, head_dim)
    if strategy == _T.TENSOR:
        return states.flatten(-2, -1).unsqueeze(-2)
    return states.unsqueeze(-2).unsqueeze(-2)


class Observer:
    """Base class of observers, and the memoryless min-max observer itself.

    Subclasses override :meth:`statistics` (what one observation says) and/or
    :meth:`combine` (how it joins what was seen before). ``kwargs`` come from the
    quantization argument's ``observer_kwargs``.
    """

    # an observer that weighs each weight column by its input channel's importance (the mean
    # square of the inputs it multiplies) says so: modifiers then give it that importance,
    # measured on calibration data, as :attr:`importance`
    uses_importance: ClassVar[bool] = False

    def __init__(self, args: QuantizationArgs, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = {**(args.observer_kwargs or {}), **kwargs}
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None  # flattened as the observed value

    @property
    def seen(self) -> bool:
        return self.min is not None

    def update(self, observed: torch.Tensor) -> None:
        """Fold one flattened observation into the range (an empty one changes nothing)."""
        if observed.numel():
            self.combine(*self.statistics(observed))

    def statistics(self, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max of one observation per quantization group, in float32 (exact: taken
        before the cast)."""
        return observed.amin(dim=(0, -1)).float(), observed.amax(dim=(0, -1)).float()

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min, self.max = lo, hi


class StaticMinMaxObserver(Observer):
    """The extremes of every observation so far."""

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.seen:
            lo, hi = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        super().combine(lo, hi)


class MovingAverage(Observer):
    """The first observation, then ``(1 - c) * so_far + c * new`` with c =
    ``averaging_constant`` (0.01), as llm-compressor's ``minmax`` and ``mse``."""

    def combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        c = float(self.kwargs.get("averaging_constant", 0.01))
        if self.seen and c != 1.0:
            lo, hi = self.min * (1.0 - c) + lo * c, self.max * (1.0 - c) + hi * c
        super().combine(lo, hi)


class MovingAverageMinMaxObserver(MovingAverage):
    pass


class MSEObserver(Observer):
    """The range, shrunk by a grid search, that minimises ``sum |q(x) - x| ** norm`` per group.

    The range is first scaled by ``expand``, then steps ``p = 1 - i / grid`` for
    ``i < maxshrink * grid`` scale min and max together; the search stops after ``patience``
    steps that improve no group. Defaults as llm-compressor's (:attr:`defaults`).
    """

    defaults: dict[str, float] = {"maxshrink": 0.20, "grid": 100.0, "norm": 2.4, "patience": 5, "expand": 1.0}

    def statistics(self, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        options = {**self.defaults, **self.kwargs}
        maxshrink, grid, norm = float(options["maxshrink"]), float(options["grid"]), float(options["norm"])
        patience, expand = int(options["patience"]), float(options["expand"])
        if expand < 1.0:
            raise ValueError(f"The mse observer's expand must be at least 1.0, got {expand}.")
        args = self.args.model_copy(update={"scale_dtype": None})  # candidates are not rounded
        per_group = args.model_copy(update={"strategy": QuantizationStrategy.TOKEN})
        x = observed.float()
        lo, hi = super().statistics(x)
        lo, hi = lo * expand, hi * expand
        best = torch.full_like(lo, torch.finfo(torch.float32).max)
        best_lo, best_hi = lo.clone(), hi.clone()
        stale = 0
        for i in range(self.steps(maxshrink, grid)):
            p = 1 - i / grid
            scale, zero_point = calculate_qparams(lo * p, hi * p, args)
            q = fake_quantize(x, scale.unsqueeze(-1), zero_point.unsqueeze(-1), per_group)
            error = (q - x).abs().pow(norm)
            if self.importance is not None:
                error = error * self.importance
            error = error.sum(dim=(0, -1))
            better = error < best
            if bool(better.any()):
                best = torch.where(better, error, best)
                best_lo, best_hi = torch.where(better, lo * p, best_lo), torch.where(better, hi * p, best_hi)
                stale = 0
            else:
                stale += 1
                if stale >= patience:
                    break
        return best_lo, best_hi

    def steps(self, maxshrink: float, grid: float) -> int:
        """How many shrink steps the search measures at most."""
        return int(maxshrink * grid)


class ExpandedMSEObserver(MSEObserver):
    """llm-compressor's ``nvfp4_expanded_mse``: the MSE search from 1.8 times the observed
    range down to 0.8 times it, in steps of 1/200 with no early stop (NVFP4's scales are
    themselves rounded to FP8, so a wider range can round better)."""

    defaults = {**MSEObserver.defaults, "expand": 1.8, "maxshrink": 1 - 0.8 / 1.8, "grid": 200.0, "patience": 1000}


class IMatrixMSEObserver(MSEObserver):
    """llm-compressor's ``imatrix_mse``: the MSE search with each weight column's error weighed
    by its input channel's importance, the mean square of that channel's inputs over the
    calibration data (llama.cpp's importance matrix), normalised to mean 1; 0.14's defaults
    (maxshrink 0.95, grid 20, norm 3, patience 5, every step down to 0.05). Without
    importance (no data reached the module) every column weighs the same."""

    uses_importance = True
    defaults = {**MSEObserver.defaults, "maxshrink": 0.95, "grid": 20.0, "norm": 3.0, "patience": 5}

    def steps(self, maxshrink: float, grid: float) -> int:
        return max(1, int(maxshrink * grid)) + 1


class MovingAverageMSEObserver(MovingAverage, MSEObserver):
    pass


BUILTIN_OBSERVERS: dict[str, type[Observer]] = {
    "memoryless_minmax": Observer,
    "static_minmax": StaticMinMaxObserver,
    "minmax": MovingAverageMinMaxObserver,
    "memoryless_mse": MSEObserver,
    "mse": MovingAverageMSEObserver,
    "nvfp4_expanded_mse": ExpandedMSEObserver,
    "imatrix_mse": IMatrixMSEObserver,
}


def observer_name(args: QuantizationArgs, base: str) -> str:
    """The observer ``args`` asks for, for a weight or an activation (llm-compressor's
    defaults and its weight substitutions)."""
    name = args.observer.lower().replace("-", "_") if args.observer else None
    if base == "weight":
        return _WEIGHT_OBSERVERS.get(name, name)
    return name or DEFAULT_ACTIVATION_OBSERVER


def observer_class(args: QuantizationArgs, base: str) -> type[Observer]:
    """The registered observer class ``args`` asks for (see :func:`observer_name`)."""
    from llmc.plugins import get_registry

    return get_registry().get("observer", observer_name(args, base))


def make_observer(args: QuantizationArgs, base: str) -> Observer:
    """A new observer for one value, from the registered observer classes."""
    return observer_class(args, base)(args)


def weight_range(
    weight: torch.Tensor, args: QuantizationArgs, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per quantization group of a weight (out, in), shaped as its scale.
    ``importance`` (in,): each input channel's mean square input, for an observer that
    weighs by it (:attr:`Observer.uses_importance`); others ignore it."""
    observer = make_observer(args, "weight")
    if importance is not None and observer.uses_importance:
        normalized = importance.float().to(weight.device) / (importance.float().mean() + torch.finfo(torch.float32).tiny)
        observer.importance = flatten_for_calibration(normalized.expand(weight.shape), "weight", args)
    observer.update(flatten_for_calibration(weight.detach(), "weight", args))
    assert observer.min is not None and observer.max is not None
    return observer.min, observer.max


def range_global_scale(lo: torch.Tensor, hi: torch.Tensor, args: QuantizationArgs) -> torch.Tensor | None:
    """The per-tensor global scale of TENSOR_GROUP (NVFP4) schemes for a per-group range,
    else None."""
    if args.strategy != QuantizationStrategy.TENSOR_GROUP:
        return None
    return generate_gparam(lo.min(), hi.max())


def global_scale(value: torch.Tensor, args: QuantizationArgs) -> torch.Tensor | None:
    """The per-tensor global scale of TENSOR_GROUP (NVFP4) schemes, else None."""
    if args.strategy != QuantizationStrategy.TENSOR_GROUP:
        return None
    return range_global_scale(*weight_range(value, args), args)


def weight_qparams(
    weight: torch.Tensor,
    args: QuantizationArgs,
    gscale: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``weight`` under ``args`` (round to nearest over the
    range its observer gives; ``importance`` as :func:`weight_range` takes it)."""
    lo, hi = weight_range(weight, args, importance)
    return calculate_qparams(lo, hi, args, global_scale=gscale)


def rounding_error(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error of rounding ``weight`` with these qparams, summed per quantization group
    (shaped as ``scale``): what a search over candidate ranges compares."""
    quantized = fake_quantize(weight, scale, zero_point, args, global_scale=global_scale)
    error = (quantized.float() - weight.float()).pow(2)
    return flatten_for_calibration(error, "weight", args).sum(dim=(0, -1)).reshape(scale.shape)
