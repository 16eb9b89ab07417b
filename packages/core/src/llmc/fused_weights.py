"""Refuse to leave fused projection weights silently unquantized.

Quantization schemes target modules (``Linear``). A model that holds projection
weights as 3-D parameters of another module, as transformers holds the experts of
its MoE models (``gate_up_proj`` of shape experts x 2·intermediate x hidden), has
nothing there for a ``Linear`` target to match: without a patch that turns those
tensors into ``Linear`` modules, the bulk of the model would be saved in full
precision, with no error. This check runs after the model patches and before
calibration, and says which modules, and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from compressed_tensors.utils import is_match

from llmc.quantization.targets import quantization_targets

# the distribution that linearizes transformers' fused MoE experts
FUSED_WEIGHTS_PROVIDER = "llmc-moe"
_SHOWN = 4


class UnquantizedFusedWeightsError(ValueError):
    """The recipe quantizes modules by class, and fused weights would be left out."""


def _fused_parameters(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """A module's stacks of weight matrices: floating-point parameters with three or more
    dimensions longer than one (experts × out × in). A vector held in more dimensions (Kimi
    Linear's ``A_log``, 1 × 1 × heads × 1) is not one, nor a table of embeddings (Gemma 4's
    vision ``position_embedding_table``), which no scheme quantizes."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return []
    return [
        (name, tuple(p.shape))
        for name, p in module.named_parameters(recurse=False)
        if sum(size > 1 for size in p.shape) >= 3 and p.is_floating_point() and "embed" not in name.lower()
    ]


def unquantized_fused_weights(
    model: torch.nn.Module, modifiers: Iterable[Any]
) -> list[tuple[str, torch.nn.Module, list[tuple[str, tuple[int, ...]]]]]:
    """Modules holding 3-D (or larger) weights that a quantizing modifier targets by class
    but cannot quantize: neither matched by its targets nor ignored."""
    quantizing = quantization_targets(modifiers)
    if not quantizing:
        return []
    left = []
    for name, module in model.named_modules():
        params = _fused_parameters(module)
        if not params:
            continue
        for targets, ignore in quantizing:
            if is_match(name, module, ignore) or is_match(name, module, targets):
                continue
            left.append((name, module, params))
            break
    return left


def check_fused_weights(model: torch.nn.Module, modifiers: Iterable[Any], allow: bool) -> None:
    """Raise when the recipe would leave fused projection weights unquantized (see module doc)."""
    left = unquantized_fused_weights(model, modifiers)
    if not left or allow:
        return
    from llmc.plugins import plugin_packages

    shown = "; ".join(
        f"{name} ({type(module).__name__}: "
        + ", ".join(f"{p} {tuple(shape)}" for p, shape in params)
        + ")"
        for name, module, params in left[:_SHOWN]
    )
    more = f" and {len(left) - _SHOWN} more" if len(left) > _SHOWN else ""
    classes = sorted({type(module).__name__ for _, module, _ in left})
    if "llmc_moe" in plugin_packages():
        hint = (
            f"The installed {FUSED_WEIGHTS_PROVIDER} does not linearize {', '.join(classes)}; "
            "a model plugin can (see docs/writing-a-plugin.md)."
        )
    else:
        hint = (
            f"{FUSED_WEIGHTS_PROVIDER} turns the fused experts of transformers' MoE models into "
            f"one Linear per expert and projection: pip install {FUSED_WEIGHTS_PROVIDER}."
        )
    raise UnquantizedFusedWeightsError(
        f"{len(left)} modules hold fused projection weights that the recipe's targets cannot "
        f"reach, so they would be saved unquantized: {shown}{more}. {hint} To keep them in full "
        f"precision on purpose, add them to ignore (e.g. 're:.*experts$') or pass "
        "allow_unquantized_fused_weights=True."
    )
