"""The AWQ scale search for one mapping: which per-channel scales quantize best."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from llmc.quantization.observers import range_global_scale, weight_range


def fake_quantized(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``weight`` under ``args`` (what RTN would store)."""
    lo, hi = weight_range(weight, args)  # once, for the global scale and the group scales
    gscale = range_global_scale(lo, hi, args)
    scale, zero_point = calculate_qparams(lo, hi, args, global_scale=gscale)
    return fake_quantize(weight, scale, zero_point, args, global_scale=gscale)


def weight_mean(weights: Sequence[torch.Tensor], args: QuantizationArgs) -> torch.Tensor:
    """Mean over output rows of |W| normalised by its group's max: how large each input channel is."""
    w = torch.cat([x.detach().float() for x in weights], dim=0)
    size = args.group_size if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP) else w.shape[1]
    grouped = w.abs().reshape(w.shape[0], -1, size)
    grouped = grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return grouped.reshape(w.shape).mean(dim=0)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int, duo_scaling: bool | str
) -> list[torch.Tensor]:
    """Identity (plain round-to-nearest) first, then x^r / w^(1-r) (``duo_scaling``) or x^r
    (not), or both (``"both"``), for r on the grid, normalised."""
    ones = torch.ones_like(x_mean)
    candidates = [ones]
    modes = [True, False] if duo_scaling == "both" else [bool(duo_scaling)]
    for duo, i in ((duo, i) for duo in modes for i in range(n_grid)):
        ratio = i / n_grid
        s = x_mean.pow(ratio) / w_mean.pow(1 - ratio) if duo else x_mean.pow(ratio)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        candidates.append(torch.where(torch.isfinite(s), s, ones))
    return candidates


@attrs.frozen
class SearchResult:
    scales: torch.Tensor
    loss: float
    rtn_loss: float  # the identity candidate: plain round-to-nearest


# The two-stage search: with at least MIN_SAMPLED_CALLS cached calls (summed over the ranks),
# every candidate is first measured on every SAMPLE_STRIDE-th call, then the SHORTLIST best of
# them and plain round-to-nearest on every call; the best of those on every call wins.
MIN_SAMPLED_CALLS = 8
SAMPLE_STRIDE = 8
SHORTLIST = 3


class OutputError:
    """Squared error of a parent module's outputs against its unquantized outputs.

    ``run(i)`` returns the parent's outputs on cached (grouped) call ``i`` of ``calls``; the
    reference is taken when this is made, so make it before any weight changes. Each call's
    error is added up on the device as it comes: no candidate's outputs are kept, nothing
    waits on the device.
    """

    def __init__(self, run: Callable[[int], torch.Tensor], calls: int) -> None:
        self.run = run
        self.reference = [run(i) for i in range(calls)]

    @property
    def calls(self) -> int:
        """How many cached calls there are: a sample of them may rank the candidates."""
        return len(self.reference)

    def _calls(self, calls: Sequence[int] | None) -> Sequence[int]:
        return range(self.calls) if calls is None else calls

    def count(self, calls: Sequence[int] | None = None) -> float:
        """Output elements measured over ``calls`` (every call: None)."""
        return float(sum(self.reference[i].numel() for i in self._calls(calls)))

    def __call__(self, calls: Sequence[int] | None = None) -> torch.Tensor:
        error = None
        for i in self._calls(calls):
            # the difference in the outputs' precision, squared and summed in float32 in one
            # pass: converting both outputs first took three passes more
            norm = torch.linalg.vector_norm(self.run(i) - self.reference[i], dtype=torch.float32).double().square()
            error = norm if error is None else error + norm.to(error.device)
        return error if error is not None else torch.zeros((), dtype=torch.float64)


class GramError:
    """Squared output error of a Linear layer that is its own only balance layer, from the
    Gram matrix G = X^T X of its inputs: ``||X (W' - W)^T||^2 = sum((W' - W) G * (W' - W))``.

    No forward pass and no cached inputs: for a down projection, one product the size of its
    weight per candidate instead of the layer over every calibration token (whose 14336-wide
    inputs were the largest of AWQ's caches). On CUDA the product runs in bfloat16 on the
    tensor cores with float32 accumulation: a candidate's loss moves by about 1e-3 relative at
    most, less than the forward pass's own rounding of its outputs.
    """

    def __init__(self, layer: torch.nn.Module, gram: torch.Tensor, tokens: int) -> None:
        self.layer = layer
        self.original = layer.weight.detach().clone()
        self.gram = gram.to(torch.bfloat16) if gram.is_cuda else gram.float()
        self.elements = float(tokens * layer.weight.shape[0])

    calls = None  # never sampled: a candidate costs one product the size of the weight

    def count(self, calls: None = None) -> float:
        return self.elements

    def __call__(self, calls: None = None) -> torch.Tensor:
        delta = self.layer.weight.detach().float() - self.original.float()
        gram = self.gram.to(delta.device)
        if gram.dtype == torch.bfloat16:
            product = torch.mm(delta.to(torch.bfloat16), gram, out_dtype=torch.float32)
        else:
            product = delta @ gram
        return torch.sum(product * delta, dtype=torch.float64)


def _sample(
    calls: int | None, reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> list[int] | None:
    """The calls to rank candidates on, or None to measure each on every call: too few calls
    over the ranks (``reduce`` sums them, so every rank decides alike)."""
    if calls is None:
        return None
    total = reduce(torch.tensor([float(calls)], dtype=torch.float64, device=device))
    if float(total.item()) < MIN_SAMPLED_CALLS:
        return None
    return list(range(0, calls, SAMPLE_STRIDE))


def search_scales(
    measure: OutputError | GramError,
    balance: Sequence[torch.nn.Module],
    x_mean: torch.Tensor,
    args: QuantizationArgs,
    n_grid: int,
    duo_scaling: bool | str,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> SearchResult:
    """Try each candidate: scale the balance weights up, quantize, scale back, measure.

    ``measure(calls)`` is the summed squared output error over those cached calls with the
    balance weights as they are now; a loss is its mean per output element
    (``measure.count(calls)``). With :data:`MIN_SAMPLED_CALLS` of ``measure.calls`` or more,
    every candidate is ranked on every :data:`SAMPLE_STRIDE`-th call first, and only the
    :data:`SHORTLIST` best and plain round-to-nearest are measured on every call: the search
    returns the candidate the full search returns whenever that one ranks among the sample's
    best, and never one worse than round-to-nearest. Weights are restored before returning;
    nothing is folded here. ``reduce`` sums errors and element counts over the ranks of a
    distributed run (their calibration inputs are each rank's share), so every rank picks the
    same candidate.
    """
    originals = [m.weight.data.clone() for m in balance]
    w_mean = weight_mean(originals, args).to(x_mean.device)
    candidates = candidate_scales(x_mean.float(), w_mean, n_grid, duo_scaling)

    def losses(indices: Sequence[int], calls: list[int] | None) -> list[float]:
        errors = []
        for i in indices:
            s = candidates[i]
            for module, w in zip(balance, originals, strict=True):
                sd = s.to(w.device, torch.float32)
                module.weight.detach().copy_((fake_quantized((w.float() * sd).to(w.dtype), args).float() / sd).to(w.dtype))
            errors.append(measure(calls).to(x_mean.device))
        count = reduce(torch.tensor([measure.count(calls)], dtype=torch.float64, device=x_mean.device))
        return (reduce(torch.stack(errors)) / count.clamp(min=1)).tolist()

    everyone = range(len(candidates))
    try:
        sample = _sample(measure.calls, reduce, x_mean.device)
        if sample is None:
            finalists: Sequence[int] = everyone
        else:
            rough = losses(everyone, sample)
            ranked = sorted(everyone, key=lambda i: (rough[i], i))
            finalists = sorted({0, *ranked[:SHORTLIST]})
        full = dict(zip(finalists, losses(finalists, None), strict=True))
    finally:
        for module, w in zip(balance, originals, strict=True):
            module.weight.detach().copy_(w)
    best = min(finalists, key=lambda i: (full[i], i))  # the first of equals, as a strict < scan
    return SearchResult(candidates[best], full[best], full[0])
