"""Smooth-layer → balance-layer mappings, shared by SmoothQuant and AWQ.

A mapping names a layer whose output feeds some linear layers (the *balance*
layers): scaling that output's channels down by ``s`` and the balance layers'
input columns up by ``s`` leaves the function unchanged. Architectures register
their default mappings through the ``llmc_register_mappings`` hook; recipes may
pass their own in llm-compressor's shape: ``[[balance regexes...], smooth regex]``
(SmoothQuant) or ``{smooth_layer: ..., balance_layers: [...]}`` (AWQ).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from llmc.naming import recipe_names

logger = logging.getLogger(__name__)


@attrs.frozen
class Mapping:
    """A smooth layer and the layers it balances, by name or ``re:`` regex.

    ``activation_hook_target`` (llm-compressor's AWQMapping field) names, relative to the
    balance layers' lowest common ancestor, the module whose input the balance layers read,
    where neither the smooth layer's output nor the first balance layer's input is that
    (parallel attention and MLP blocks); None observes those as usual.
    """

    smooth_layer: str
    balance_layers: tuple[str, ...] = attrs.field(converter=tuple)
    activation_hook_target: str | None = None

    @classmethod
    def parse(cls, value: Any) -> Mapping:
        if isinstance(value, Mapping):
            return value
        if isinstance(value, dict) and "smooth_layer" in value:
            return cls(value["smooth_layer"], value["balance_layers"], value.get("activation_hook_target"))
        if hasattr(value, "smooth_layer") and hasattr(value, "balance_layers"):  # e.g. llm-compressor's AWQMapping
            return cls(value.smooth_layer, value.balance_layers, getattr(value, "activation_hook_target", None))
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], str):
            balance = [value[0]] if isinstance(value[0], str) else value[0]
            return cls(value[1], balance)
        raise ValueError(
            f"Cannot read mapping {value!r}: expected [[balance layer regexes], smooth layer regex] "
            "or {smooth_layer: ..., balance_layers: [...]}."
        )


# llm-compressor's name for a mapping given to AWQ (``AWQMapping(smooth_layer, balance_layers)``)
AWQMapping = Mapping


@attrs.frozen
class ResolvedMapping:
    """One smooth module and the modules it balances, by name."""

    smooth_name: str
    smooth: torch.nn.Module
    balance_names: tuple[str, ...]
    balance: tuple[torch.nn.Module, ...]
    # the module whose input the balance layers read, where the mapping names one
    observed: torch.nn.Module | None = None


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(_matches(p, name) for p in ignore)


def default_mappings(model: torch.nn.Module, algorithm: str) -> tuple[list[Mapping], str]:
    """The mappings registered for ``algorithm`` on ``model``'s class, and the module they are
    resolved in ("" for the whole model), or a clear error.

    A vision-language model without mappings of its own takes its language model's (those of
    the causal LM its text config names, e.g. Qwen3_5ForCausalLM's for
    Qwen3_5ForConditionalGeneration), resolved inside the language model only: a vision
    tower's blocks, which text calibration never runs, are left as they are."""
    from llmc.plugins import get_registry

    registry = get_registry()
    arch = type(model).__name__
    if registry.has("mapping", mapping_key(algorithm, arch)):
        return list(registry.get("mapping", mapping_key(algorithm, arch))), ""
    text_arch, scope = _language_model(model)
    if text_arch is not None and registry.has("mapping", mapping_key(algorithm, text_arch)):
        logger.info("%s: %s's default %s mappings, inside %s", arch, text_arch, algorithm, scope)
        return list(registry.get("mapping", mapping_key(algorithm, text_arch))), scope
    known = sorted(n.partition("/")[2] for n in registry.names("mapping") if n.startswith(algorithm + "/"))
    raise ValueError(
        f"No default {algorithm} mappings for {arch}. Pass mappings= in the recipe, e.g. "
        "mappings: [[['re:.*q_proj', 're:.*k_proj', 're:.*v_proj'], 're:.*input_layernorm']], "
        "or install a model plugin that registers them (llmc_register_mappings). "
        f"Architectures with {algorithm} defaults: {', '.join(known) or 'none'}."
    )


def _language_model(model: torch.nn.Module) -> tuple[str | None, str]:
    """The causal LM class named by a multimodal model's text config, and the name of the
    language model inside ``model`` (its decoder); (None, "") for a model that is its own."""
    config = getattr(model, "config", None)
    get_decoder = getattr(model, "get_decoder", None)
    if config is None or get_decoder is None:
        return None, ""
    text = config.get_text_config(decoder=True)
    if text is config:
        return None, ""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError):
        return None, ""
    scope = next((name for name, module in model.named_modules() if module is decoder and name), None)
    model_type = getattr(text, "model_type", None)
    text_arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or TEXT_MODEL_LAYOUTS.get(model_type)
    return (text_arch, scope) if text_arch and scope else (None, "")


# language models of vision-language families that have no causal LM class of their own, and the
# causal LM whose layers are theirs
TEXT_MODEL_LAYOUTS = {
    "qwen2_vl_text": "Qwen2ForCausalLM",
    "qwen2_5_vl_text": "Qwen2ForCausalLM",
    "qwen3_vl_text": "Qwen3ForCausalLM",
    "qwen3_vl_moe_text": "Qwen3MoeForCausalLM",
}


def mapping_key(algorithm: str, architecture: str) -> str:
    """The registry name of one algorithm's mappings for one architecture."""
    return f"{algorithm}/{architecture}"


def resolve_mappings(
    model: torch.nn.Module, mappings: Sequence[Any] | None, algorithm: str, ignore: Iterable[str] = ()
) -> list[ResolvedMapping]:
    """Match each mapping to modules: every smooth layer, with the balance layers under its parent.

    A mapping whose smooth layer matches nothing, or a smooth layer that finds
    none of its balance layers, is an error (a typo would silently do nothing).
    """
    scope = ""
    if mappings is None:
        parsed, scope = default_mappings(model, algorithm)
    else:
        parsed = [Mapping.parse(m) for m in mappings]
    inside = scope + "." if scope else ""
    modules = dict(model.named_modules())
    aliases = recipe_names(model)  # llm-compressor's names of linearized experts' projections

    def named(pattern: str, name: str) -> bool:
        return _matches(pattern, name) or (name in aliases and _matches(pattern, aliases[name]))

    ignore = list(ignore)
    resolved: list[ResolvedMapping] = []
    for mapping in parsed:
        smooth_names = [n for n in modules if named(mapping.smooth_layer, n) and n.startswith(inside)]
        if not smooth_names:
            raise ValueError(
                f"{algorithm} mapping smooth layer {mapping.smooth_layer!r} matches no module of "
                f"{type(model).__name__}. Check the regex against model.named_modules()."
            )
        for smooth_name in smooth_names:
            scope = smooth_name.rpartition(".")[0]
            # the nearest enclosing module whose subtree holds the balance layers
            while True:
                prefix = scope + "." if scope else ""
                balance = [
                    n
                    for n in modules
                    if n.startswith(prefix)
                    and any(named(p, n) for p in mapping.balance_layers)
                ]
                if balance or not scope:
                    break
                scope = scope.rpartition(".")[0]
            if not balance:
                raise ValueError(
                    f"{algorithm} mapping {mapping.balance_layers} finds no balance layer for "
                    f"{smooth_name!r}. Check the regexes against model.named_modules()."
                )
            # ignored balance layers are still scaled (or the function would change), only
            # not quantized; a mapping whose every layer is ignored is left alone
            if _ignored(smooth_name, ignore) or all(_ignored(n, ignore) for n in balance):
                continue
            resolved.append(
                ResolvedMapping(
                    smooth_name, modules[smooth_name], tuple(balance), tuple(modules[n] for n in balance),
                    _hook_target(mapping, balance, modules),
                )
            )
    return resolved


def _hook_target(mapping: Mapping, balance: list[str], modules: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The module ``mapping.activation_hook_target`` names under the balance layers' lowest
    common ancestor other than a ModuleList (as llm-compressor resolves it), or None when the
    mapping names none."""
    if mapping.activation_hook_target is None:
        return None
    from compressed_tensors.utils import get_lowest_common_ancestor_name

    ancestor = get_lowest_common_ancestor_name(balance)
    while ancestor and isinstance(modules[ancestor], torch.nn.ModuleList):
        ancestor = ancestor.rpartition(".")[0]
    name = ".".join(filter(None, [ancestor, mapping.activation_hook_target]))
    if name not in modules:
        raise ValueError(
            f"activation_hook_target {mapping.activation_hook_target!r} of mapping {mapping.smooth_layer!r} "
            f"is no module under {ancestor!r}: name it relative to the balance layers' common parent."
        )
    return modules[name]


def balance_input_source(mapping: ResolvedMapping) -> tuple[torch.nn.Module, bool]:
    """Where to observe every tensor the mapping's balance layers read: ``(module, output)``,
    its output when ``output`` is true, else its input (for :meth:`Modifier.observe`).

    A norm's output is exactly that, for every token, even when a balance layer
    sees only some tokens (an MoE expert its router did not choose); a linear smooth
    layer's output is not (attention lies between ``v_proj`` and ``o_proj``), so there
    the first balance layer's input is observed.
    """
    if mapping.observed is not None:
        return mapping.observed, False
    if isinstance(mapping.smooth, torch.nn.Linear):
        return mapping.balance[0], False
    return mapping.smooth, True


def fold_scales(mapping: ResolvedMapping, scales: torch.Tensor) -> None:
    """Divide the smooth layer's output channels by ``scales``, multiply the balance inputs by them.

    The smooth layer is a norm (weight, optional bias; Gemma-style norms scale by
    ``1 + weight``) or a linear layer (rows of its weight and bias).
    """
    smooth = mapping.smooth
    with torch.no_grad():
        s = scales.to(torch.float32)
        weight = smooth.weight
        if isinstance(smooth, torch.nn.Linear):
            new = weight.float() / s.to(weight.device)[:, None]
        elif _offset_norm(smooth):
            new = (1.0 + weight.float()) / s.to(weight.device) - 1.0
        else:
            new = weight.float() / s.to(weight.device)
        weight.copy_(new.to(weight.dtype))
        bias = getattr(smooth, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
        for layer in mapping.balance:
            w = layer.weight
            w.copy_((w.float() * s.to(w.device)[None, :]).to(w.dtype))


def _offset_norm(module: torch.nn.Module) -> bool:
    """Norms that multiply by ``1 + weight`` (Gemma, Qwen3-Next, Qwen3.5) rather than ``weight``:
    an RMS norm is asked, on a probe input, which of the two it computes (a family's class
    names change; its arithmetic decides)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 1 or weight.is_meta or "rmsnorm" not in type(module).__name__.lower():
        return False
    with torch.no_grad():
        probe = torch.linspace(-2.0, 3.0, weight.shape[0], device=weight.device)[None]
        unit = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True))
        out = type(module).forward(module, probe.to(weight.dtype)).float()  # no hooks: observers see nothing
        w = weight.float()
        offset, plain = (out - unit * (1.0 + w)).abs().max(), (out - unit * w).abs().max()
    return bool(offset < plain)


# transformers classes whose layers are Llama's: input_layernorm -> self_attn.q/k/v_proj,
# post_attention_layernorm -> mlp.gate/up_proj, self_attn.v_proj -> o_proj, mlp.up_proj -> down_proj
DENSE_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Qwen3_5ForCausalLM",
)


def norm_mappings(attention: str = "self_attn", mlp: str = "mlp") -> list[Mapping]:
    """Each decoder layer's two norms and the projections they feed (Llama's layout; in the
    linear attention layers of hybrid models such as Qwen3.5, the attention norm feeds the
    linear attention's input projections instead)."""
    return [
        Mapping("re:.*input_layernorm", [f"re:.*{attention}\\.(q|k|v)_proj", r"re:.*linear_attn\.in_proj_\w+"]),
        Mapping("re:.*post_attention_layernorm", [f"re:.*{mlp}\\.(gate|up)_proj"]),
    ]


def inner_mappings(attention: str = "self_attn", mlp: str = "mlp") -> list[Mapping]:
    """The linear pairs inside a Llama layer: v_proj -> o_proj (per head), up_proj -> down_proj
    (the activation is linear in up)."""
    return [
        Mapping(f"re:.*{attention}\\.v_proj", [f"re:.*{attention}\\.o_proj"]),
        Mapping(f"re:.*{mlp}\\.up_proj", [f"re:.*{mlp}\\.down_proj"]),
    ]


def phi3_norm_mappings() -> list[Mapping]:
    """Phi-3's norms feed fused projections (qkv_proj, gate_up_proj)."""
    return [
        Mapping("re:.*input_layernorm", ["re:.*qkv_proj"]),
        Mapping("re:.*post_attention_layernorm", ["re:.*gate_up_proj"]),
    ]
