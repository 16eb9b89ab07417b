"""Grouping a layer's GPTQ problems into as few solves as possible.

The solve quantizes columns one at a time, a dozen tiny kernels each: for the small
matrices of an MoE layer (hundreds of experts) the kernels' count, not their work,
sets the time. Two groupings cut it without changing any result:

* modules fed the same input share a Hessian (q/k/v; every expert's gate and up
  projections when every token goes through every expert); with per-row scales
  (group or channel strategies) each row is solved independently under that
  Hessian, so their weights stack into one taller matrix;
* matrices of one shape and scheme with different Hessians (each expert's down
  projection) solve as a batch, every kernel advancing all of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import attrs
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from llmc import distributed
from llmc_gptq.hessian import HessianAccumulator

# elements of float32 weight per batched solve (the solve holds about four copies)
MAX_BATCH_ELEMENTS = 2**28


@attrs.define
class Matrix:
    """One matrix to solve: the rows of one or more modules stacked, one Hessian."""

    members: list[tuple[str, torch.nn.Module]]
    hessian: torch.Tensor
    shared: bool = False  # another Matrix solves under the same Hessian: the solve gets a copy

    @property
    def label(self) -> str:
        names = [n for n, _ in self.members]
        return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} sharing its Hessian)"

    @property
    def shape(self) -> tuple[int, int]:
        weights = [m.weight for _, m in self.members]
        return sum(w.shape[0] for w in weights), weights[0].shape[1]

    def weight(self) -> torch.Tensor:
        return torch.cat([m.weight.data for _, m in self.members]) if len(self.members) > 1 else self.members[0][1].weight.data


@attrs.define
class Solve:
    """Matrices of one shape and scheme, solved in one batched call."""

    matrices: list[Matrix]
    args: QuantizationArgs
    scale_dtype: torch.dtype

    def weights(self) -> torch.Tensor:
        return torch.stack([m.weight() for m in self.matrices])

    def hessians(self) -> torch.Tensor:
        device = self.matrices[0].members[0][1].weight.device
        if len(self.matrices) == 1 and not self.matrices[0].shared:  # a view: the solve consumes it
            stacked = self.matrices[0].hessian.to(device)[None]
        else:
            stacked = torch.stack([m.hessian.to(device) for m in self.matrices])
        for m in self.matrices:
            m.hessian = None  # type: ignore[assignment]
        return stacked

    def global_scales(self) -> torch.Tensor | None:
        """Each matrix's global scale (TENSOR_GROUP schemes: the first member's; a matrix
        stacks only modules that share one), else None."""
        if self.args.strategy != QuantizationStrategy.TENSOR_GROUP:
            return None
        return torch.stack([m.members[0][1].weight_global_scale.detach().float().reshape(1) for m in self.matrices])

    def cost(self) -> float:
        """Relative time of the solve (the column loop and updates grow as rows × columns²)."""
        rows, columns = self.matrices[0].shape
        return float(len(self.matrices) * rows * columns * columns)

    def broadcast(self, owner: int) -> None:
        """The solved weights and qparams from the rank that solved them (distributed runs)."""
        for matrix in self.matrices:
            for _, module in matrix.members:
                for name in ("weight", "weight_scale", "weight_zero_point"):
                    if hasattr(module, name):
                        distributed.broadcast(getattr(module, name).data, owner)

    def write_back(self, results: list) -> None:
        for matrix, result in zip(self.matrices, results, strict=True):
            start = 0
            for _, module in matrix.members:
                rows = module.weight.shape[0]
                module.weight.detach().copy_(result.weight[start : start + rows])
                _copy_rows(module.weight_scale, result.scale, start, rows)
                if hasattr(module, "weight_zero_point"):
                    _copy_rows(module.weight_zero_point, result.zero_point, start, rows)
                start += rows


def _copy_rows(param: torch.Tensor, value: torch.Tensor, start: int, rows: int) -> None:
    if value.shape[0] >= start + rows and value.ndim == param.ndim and value.shape[1:] == param.shape[1:]:
        value = value[start : start + rows]  # per-row qparams of one member
    param.detach().copy_(value.reshape(param.shape))


def _row_independent(args: QuantizationArgs) -> bool:
    return args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)


def _matrices(
    modules: list[tuple[str, torch.nn.Module]], hessians: HessianAccumulator, stack: bool
) -> Iterator[Matrix]:
    """Pop every module's Hessian; stack the modules that share one when their rows may
    (and ``stack``)."""
    by_key: dict[int, list[tuple[str, torch.nn.Module]]] = defaultdict(list)
    for name, module in modules:
        by_key[hessians.owner[module]].append((name, module))
    for members in by_key.values():
        # every member takes the Hessian out of the accumulator; the solve stacks a copy of it
        hessian = [hessians.pop(m) for _, m in members][-1][0]
        first = members[0][1].quantization_scheme.weights
        stackable = stack and _row_independent(first) and all(
            m.quantization_scheme.weights == first
            and m.weight.shape[1] == members[0][1].weight.shape[1]
            and m.weight.dtype == members[0][1].weight.dtype
            for _, m in members
        )
        groups: list[list[tuple[str, torch.nn.Module]]] = []
        if stackable:
            # stacked matrices stay within the batched solves' memory budget (about four float32
            # copies of MAX_BATCH_ELEMENTS): 256 experts of a large MoE solve in a few matrices
            size = 0
            for member in members:
                elements = member[1].weight.numel()
                if not groups or size + elements > MAX_BATCH_ELEMENTS:
                    groups.append([])
                    size = 0
                groups[-1].append(member)
                size += elements
        else:
            groups = [[member] for member in members]
        for group in groups:
            yield Matrix(group, hessian, shared=len(groups) > 1)


def plan_solves(
    modules: list[tuple[str, torch.nn.Module]], hessians: HessianAccumulator, batched: bool = True
) -> list[Solve]:
    """The solves for ``modules`` (each has a Hessian in ``hessians``), batched by shape and
    scheme; ``batched=False``: one solve per module."""
    if not batched:
        return [Solve([m], m.members[0][1].quantization_scheme.weights, m.members[0][1].weight_scale.dtype)
                for m in _matrices(modules, hessians, stack=False)]
    groups: dict[tuple, list[Matrix]] = defaultdict(list)
    for matrix in _matrices(modules, hessians, stack=True):
        module = matrix.members[0][1]
        args = module.quantization_scheme.weights
        key = (
            matrix.shape,
            module.weight.dtype,
            module.weight.device,
            module.weight_scale.dtype,
            args.model_dump_json(),
        )
        groups[key].append(matrix)
    solves = []
    for (shape, _, _, scale_dtype, _), matrices in groups.items():
        args = matrices[0].members[0][1].quantization_scheme.weights
        per_solve = max(1, MAX_BATCH_ELEMENTS // (shape[0] * shape[1]))
        for i in range(0, len(matrices), per_solve):
            solves.append(Solve(matrices[i : i + per_solve], args, scale_dtype))
    return solves
