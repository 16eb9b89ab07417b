"""Finding a model's MoE blocks, and cutting experts out of one.

A block is a module with linearized ``experts`` (:class:`llmc_moe.LinearExperts`) and a
router (``gate`` or ``router``) whose ``weight`` has a row per expert. Cutting keeps the
retained experts (renumbered from 0), the router's rows for them (weight, bias, DeepSeek's
score-correction bias) and every expert count the modules and the config carry.
"""

from __future__ import annotations

import re

import attrs
import torch
from torch import nn

from llmc_moe import LinearExperts

ROUTER_ATTRIBUTES = ("gate", "router")
# what transformers' MoE configs call the expert count, the experts per token and routing groups
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k")
GROUP_KEYS = ("n_group",)
TOP_K_GROUP_KEYS = ("topk_group", "top_k_group")
# expert counts modules keep as plain ints
MODULE_COUNT_KEYS = ("num_experts", "n_experts", "n_routed_experts", "num_local_experts")


@attrs.frozen
class Routing:
    """The text config's MoE sizes."""

    num_experts: int
    top_k: int
    groups: int | None  # group-limited routing (DeepSeek-V3, GLM-4-MoE): experts per group equal
    top_k_groups: int | None


def _first(config: object, keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def routing(model: nn.Module) -> Routing:
    config = model.config.get_text_config(decoder=True)
    count, top_k = _first(config, EXPERT_COUNT_KEYS), _first(config, TOP_K_KEYS)
    if count is None or top_k is None:
        raise ValueError(
            f"{type(config).__name__} names no expert count ({', '.join(EXPERT_COUNT_KEYS)}) or experts "
            f"per token ({', '.join(TOP_K_KEYS)}): REAP prunes the experts of MoE models."
        )
    groups, top_k_groups = _first(config, GROUP_KEYS), _first(config, TOP_K_GROUP_KEYS)
    if groups is not None and groups[1] > 1 and top_k_groups is not None:
        return Routing(count[1], top_k[1], groups[1], top_k_groups[1])
    return Routing(count[1], top_k[1], None, None)


def _router(block: nn.Module) -> nn.Module | None:
    for name in ROUTER_ATTRIBUTES:
        router = getattr(block, name, None)
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return router
    return None


def _ignored(name: str, ignore: list[str]) -> bool:
    """llm-compressor's REAP matches ``ignore`` as regular expressions searched in the name;
    a leading ``re:`` (the other modifiers' form) is accepted too."""
    return any(re.search(pattern.removeprefix("re:"), name) for pattern in ignore)


def moe_blocks(model: nn.Module, ignore: list[str]) -> dict[str, nn.Module]:
    """The MoE blocks whose experts REAP can prune, by name."""
    found, fused = {}, []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or _router(module) is None or _ignored(name, ignore):
            continue
        if isinstance(experts, LinearExperts) and not experts.scale_inputs:
            found[name] = module
        else:
            fused.append(f"{name} ({type(experts).__name__})")
    if not found:
        detail = f"; these are not linearized experts REAP can weigh: {', '.join(fused[:3])}" if fused else ""
        raise ValueError(
            f"{type(model).__name__} has no MoE block REAP can prune (experts linearized by llmc-moe and a "
            f"router with a weight row per expert){detail}. Llama 4, whose routing weights scale the "
            "experts' inputs, is not supported."
        )
    return found


def keep_experts(block: nn.Module, retained: list[int]) -> None:
    """Cut ``block`` to the experts ``retained``: experts, router rows, expert counts."""
    block.experts.keep(retained)
    router = _router(block)
    assert router is not None
    index = torch.tensor(retained, dtype=torch.long, device=router.weight.device)
    router.weight = nn.Parameter(router.weight.detach()[index].contiguous(), requires_grad=False)
    if getattr(router, "bias", None) is not None:
        router.bias = nn.Parameter(router.bias.detach()[index].contiguous(), requires_grad=False)
    for holder in (block, router):
        correction = getattr(holder, "e_score_correction_bias", None)
        if isinstance(correction, torch.Tensor):
            holder.e_score_correction_bias = correction.detach()[index.to(correction.device)].contiguous()
    if isinstance(getattr(router, "out_features", None), int):
        router.out_features = len(retained)
    for holder in (block, router, block.experts):
        for key in MODULE_COUNT_KEYS:
            if isinstance(getattr(holder, key, None), int):
                setattr(holder, key, len(retained))


def set_expert_count(model: nn.Module, count: int) -> tuple[str, int]:
    """Write ``count`` into the text config's expert count; returns its key and old value."""
    config = model.config.get_text_config(decoder=True)
    key, old = _first(config, EXPERT_COUNT_KEYS)  # type: ignore[misc]
    setattr(config, key, count)
    return key, old
