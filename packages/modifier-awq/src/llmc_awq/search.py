"""The AWQ scale search for one mapping: which per-channel scales quantize best."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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


class OutputError:
    """Squared error of a parent module's outputs against its unquantized outputs.

    ``run_parent()`` yields the parent's outputs on the cached calibration inputs, one
    (grouped) call at a time; the reference is taken when this is made, so make it before
    any weight changes. Each call's error is added up on the device as it comes: no
    candidate's outputs are kept, nothing waits on the device.
    """

    def __init__(self, run_parent: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.run_parent = run_parent
        self.reference = list(run_parent())
        self.count = float(sum(r.numel() for r in self.reference))

    def __call__(self) -> torch.Tensor:
        error = None
        for o, r in zip(self.run_parent(), self.reference, strict=True):
            # the difference in the outputs' precision, squared and summed in float32 in one
            # pass: converting both outputs first took three passes more
            norm = torch.linalg.vector_norm(o - r, dtype=torch.float32).double().square()
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
        self.count = float(tokens * layer.weight.shape[0])

    def __call__(self) -> torch.Tensor:
        delta = self.layer.weight.detach().float() - self.original.float()
        gram = self.gram.to(delta.device)
        if gram.dtype == torch.bfloat16:
            product = torch.mm(delta.to(torch.bfloat16), gram, out_dtype=torch.float32)
        else:
            product = delta @ gram
        return torch.sum(product * delta, dtype=torch.float64)


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

    ``measure()`` is the summed squared output error with the balance weights as they are
    now; the loss is its mean per output element (``measure.count`` of them). Weights are
    restored before returning; nothing is folded here. ``reduce`` sums the candidates' errors
    and the element count over the ranks of a distributed run (their calibration inputs are
    each rank's share), so every rank picks the same candidate.
    """
    originals = [m.weight.data.clone() for m in balance]
    w_mean = weight_mean(originals, args).to(x_mean.device)
    candidates = candidate_scales(x_mean.float(), w_mean, n_grid, duo_scaling)
    errors = []
    try:
        for s in candidates:
            for module, w in zip(balance, originals, strict=True):
                sd = s.to(w.device, torch.float32)
                module.weight.data.copy_((fake_quantized((w.float() * sd).to(w.dtype), args).float() / sd).to(w.dtype))
            errors.append(measure().to(x_mean.device))
    finally:
        for module, w in zip(balance, originals, strict=True):
            module.weight.data.copy_(w)
    count = reduce(torch.tensor([measure.count], dtype=torch.float64, device=x_mean.device))
    losses = (reduce(torch.stack(errors)) / count.clamp(min=1)).tolist()
    best = min(range(len(losses)), key=lambda i: (losses[i], i))  # the first of equals, as a strict < scan
    return SearchResult(candidates[best], losses[best], losses[0])
