"""Running a parent module on several cached calibration calls at once.

AWQ's search runs each mapping's parent once per candidate scale (21 by default) over every
cached batch. At one 512-token sequence per batch the kernels are small and their launches,
not their work, set the time (an 8B layer's search launched 197 529 kernels for 3 mappings).
Consecutive calls whose tensors line up are concatenated along the batch dimension, tensors
equal in every call of a group (rotary embeddings, a causal mask, positions) passed once for
the group to broadcast, so the parent runs once per group instead of once per batch. Each
token's arithmetic is the same; only the products' tiling, hence their last bits, may differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

# tokens per grouped call: 8 sequences of 512, 4 of 2048; large enough that launches stop
# mattering, small enough that the parent's activations for a group stay a few hundred MB
TOKENS_PER_CALL = 8192

Call = tuple[tuple, dict, "torch.Tensor | None"]  # (args, kwargs, loss mask) as AWQ caches them


@attrs.frozen
class Group:
    indices: list[int]
    concatenated: list[bool]  # per flattened tensor of the call: concatenated, or the first's passed


def _tokens(leaves: list[Any]) -> int:
    first = next((t for t in leaves if isinstance(t, torch.Tensor) and t.ndim >= 2), None)
    return 0 if first is None else first.numel() // first.shape[-1]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a plain equality: not the same
        return False


def _join(leaves: list[Any], other: list[Any], concatenated: list[bool]) -> list[bool] | None:
    """Which leaves a group extended by ``other`` concatenates, or None if it cannot take it."""
    joined = []
    for a, b, concat in zip(leaves, other, concatenated, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or not _same(a, b):
                return None
            joined.append(False)
        elif a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return None
        elif not concat and (a is b or torch.equal(a, b)):
            joined.append(False)
        elif a.ndim >= 2:  # a batch dimension first
            joined.append(True)
        else:
            return None
    return joined


def _masks_join(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Loss masks are per token: always concatenated, so both absent or of one shape."""
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape)


def plan_groups(calls: Sequence[Call], tokens_per_call: int = TOKENS_PER_CALL) -> list[Group]:
    """Consecutive calls grouped while their structure, shapes and loss masks line up."""
    groups: list[Group] = []
    first: list[Any] = []
    spec = first_mask = None
    for i, (args, kwargs, mask) in enumerate(calls):
        leaves, this_spec = tree_flatten((args, kwargs))
        if groups:
            group = groups[-1]
            fits = _tokens(first) * (len(group.indices) + 1) <= tokens_per_call
            joined = _join(first, leaves, group.concatenated) if fits and this_spec == spec else None
            if joined is not None and _masks_join(first_mask, mask):
                groups[-1] = Group([*group.indices, i], joined)
                continue
        first, spec, first_mask = leaves, this_spec, mask
        groups.append(Group([i], [False] * len(leaves)))
    return groups


def grouped_calls(calls: Sequence[Call], groups: list[Group], move: Any) -> Iterator[Call]:
    """Each group's call: its members' tensors (brought over by ``move``) concatenated where
    the plan says, the first member's elsewhere."""
    for group in groups:
        if len(group.indices) == 1:
            yield move(calls[group.indices[0]])
            continue
        members = [tree_flatten((calls[i][0], calls[i][1])) for i in group.indices]
        spec = members[0][1]
        leaves = [
            move(torch.cat([m[0][j] for m in members])) if concat else move(members[0][0][j])
            for j, concat in enumerate(group.concatenated)
        ]
        args, kwargs = tree_unflatten(leaves, spec)
        masks = [calls[i][2] for i in group.indices]
        yield args, kwargs, None if masks[0] is None else move(torch.cat(masks))


def checked_groups(
    calls: Sequence[Call], groups: list[Group], move: Any, run: Callable[[tuple, dict, Any], torch.Tensor]
) -> list[Group]:
    """``groups``, if the first group of several gives what its calls give one by one (``run``
    returns a call's output as token rows); else one call per group.

    Passing an equal tensor once assumes the parent broadcasts it over the batch, as rotary
    embeddings and 4-D masks are; a model whose module builds per-batch state from such an
    argument may not, so each mapping checks once (a group's worth of extra forward passes)
    and falls back to calling the parent batch by batch."""
    several = next((g for g in groups if len(g.indices) > 1), None)
    if several is None:
        return groups
    try:
        (together,) = [run(*call) for call in grouped_calls(calls, [several], move)]
        alone = torch.cat([run(*move(calls[i])) for i in several.indices])
        same = together.shape == alone.shape and torch.allclose(together.float(), alone.float(), rtol=2e-2, atol=1e-3)
    except Exception as exc:  # noqa: BLE001 - any failure of the grouped call means: do not group
        logger.debug("Grouped parent call failed (%s); calling it batch by batch.", exc)
        same = False
    if same:
        return groups
    logger.info("This parent does not take several cached batches at once; its search calls it batch by batch.")
    return [Group([i], [False] * len(g.concatenated)) for g in groups for i in g.indices]
