"""Replace every fused experts module of a model by :class:`~llmc_moe.experts.LinearExperts`.

One mechanism for transformers' standard layout (every experts class decorated
with ``use_experts_implementation``: Qwen2/3-MoE, Qwen3-Next, Mixtral, OLMoE,
DeepSeek-V2/V3, GLM-4-MoE, Granite-MoE, Phi-MoE, gpt-oss, ...) and an adapter
per family whose experts are called differently (:data:`ADAPTERS`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm

from llmc_moe.experts import LinearExperts
from llmc_moe.layout import BIAS_SUFFIX, FUSED_NAMES, FusedLayout, projection_names
from llmc_moe.llama4 import adapt_llama4_block
from llmc_moe.stacked import WeightStacks

logger = logging.getLogger(__name__)


@attrs.frozen
class Adapter:
    """How to linearize experts whose block does not call them as (hidden, indices, weights)."""

    scale_inputs: bool
    adapt_block: Callable[[nn.Module], None]


# experts class name -> adapter for families outside transformers' standard experts call
ADAPTERS: dict[str, Adapter] = {
    "Llama4TextExperts": Adapter(scale_inputs=True, adapt_block=adapt_llama4_block),
}


def _standard(module: nn.Module) -> bool:
    """Decorated with ``use_experts_implementation``: called as (hidden, indices, weights)."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate")


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module, FusedLayout]]:
    """The experts modules this package linearizes, with their layouts."""
    found = []
    for name, module in model.named_modules():
        layout = FusedLayout.of(module)
        if layout is not None and (_standard(module) or type(module).__name__ in ADAPTERS):
            found.append((name, module, layout))
    return found


def _release(fused: nn.Module) -> None:
    """Drop the fused parameters (the Linear modules own copies); the module stays for its
    gate function and activation."""
    for name in FUSED_NAMES:
        for attr in (name, name + BIAS_SUFFIX):
            if attr in fused._parameters:
                delattr(fused, attr)


def linearize(model: nn.Module) -> list[str]:
    """Linearize every fused experts module of ``model`` in place; returns their names."""
    found = fused_experts(model)
    if not found:
        return []
    names = projection_names(model)
    modules = dict(model.named_modules())
    stacks = WeightStacks()  # one store for the model: one layer's stacked weights at a time
    for name, fused, layout in tqdm(found, desc="Linearizing experts", unit="layer"):
        adapter = ADAPTERS.get(type(fused).__name__)
        with torch.no_grad():
            linear = LinearExperts.from_fused(
                fused, layout, names, scale_inputs=adapter is not None and adapter.scale_inputs, stacks=stacks
            )
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, linear)
        _release(fused)
        if adapter is not None:
            adapter.adapt_block(parent)
    logger.info(
        "Linearized %d experts modules (%s, %d experts each); projections named %s/%s/%s",
        len(found),
        type(found[0][1]).__name__,
        model.get_submodule(found[0][0]).num_experts,
        names.gate,
        names.up,
        names.down,
    )
    if not names.reloadable:
        logger.warning(
            "%s checkpoints hold their experts fused, and transformers has no conversion that "
            "loads per-expert tensors into them: the checkpoint saved from this model (one "
            "tensor per expert, as vLLM reads it) will not reload through "
            "AutoModelForCausalLM.from_pretrained. llmc.evaluation.load_decompressed reloads it.",
            type(model).__name__,
        )
    return [name for name, _, _ in found]


def linear_experts(model: nn.Module) -> list[tuple[str, LinearExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearExperts)]
