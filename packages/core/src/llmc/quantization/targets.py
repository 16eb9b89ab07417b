"""What a recipe's quantizing modifiers target, asked of a loaded model before calibration."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from compressed_tensors.utils import is_match


def quantization_targets(modifiers: Iterable[Any]) -> list[tuple[list[str], list[str]]]:
    """(targets, ignore) of every modifier that applies a compressed-tensors config."""
    found = []
    for modifier in modifiers:
        config = getattr(modifier, "config", None)
        groups = getattr(config, "config_groups", None)
        if not groups:
            continue
        targets = sorted({t for scheme in groups.values() for t in scheme.targets})
        found.append((targets, list(config.ignore or [])))
    return found


def quantizes_output_embeddings(model: torch.nn.Module, modifiers: Iterable[Any]) -> bool:
    """Whether a quantizing modifier targets the model's output embeddings (``lm_head``)."""
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if outputs is None:
        return False
    name = next((n for n, m in model.named_modules() if m is outputs), None)
    return any(
        is_match(name, outputs, targets) and not is_match(name, outputs, ignore)
        for targets, ignore in quantization_targets(modifiers)
    )
