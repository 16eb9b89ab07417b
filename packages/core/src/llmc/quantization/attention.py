"""Attention quantization: calibrated query, key and value scales on attention modules.

llm-compressor writes it as a config group whose targets are attention modules and whose only
arguments are ``input_activations`` (``targets: [LlamaAttention]``, FP8 per tensor): each module
gets ``q_scale``, ``k_scale`` and ``v_scale``, and the checkpoint's ``kv_cache_scheme`` is those
arguments, as vLLM's FP8 attention reads them. Keys and values come through llmc's KV-cache tap
(:mod:`llmc.quantization.kv_cache`). Queries after RoPE reach only the attention function,
which transformers looks up by name in its registry each call: the model's implementation is
switched to ``llmc_quantized_query_<original>``, registered once per original implementation,
which observes and fake-quantizes each tapped module's queries and calls the original.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
from compressed_tensors.utils import get_head_dim, get_num_attn_heads

from llmc.quantization.kv_cache import QUERY_HOOKS, apply_kv_cache_scheme

PREFIX = "llmc_quantized_query_"

QueryHook = Callable[[torch.nn.Module, torch.Tensor], None]


def _original_function(original: str, module: torch.nn.Module) -> Callable[..., Any]:
    """The attention function ``original`` names: a registered one, or ("eager", which
    transformers does not register) the eager function of the module's own model file."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__}: no attention function {original!r} to call.")
    return eager


def _tapped(original: str) -> Callable[..., Any]:
    def attention(module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hooks = getattr(module, QUERY_HOOKS, None)
        if hooks is not None:
            for hook in hooks:
                hook(module, query)
            if getattr(module, "quantization_enabled", True):
                query = forward_quantize(module, query, "q", module.quantization_scheme.input_activations)
        return _original_function(original, module)(module, query, *args, **kwargs)

    return attention


def _tap_queries(model: torch.nn.Module) -> None:
    """Route the model's attention calls through the query tap (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _tapped(current))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__}'s attention does not dispatch through transformers' attention "
            "registry, so its queries cannot be quantized; quantize keys and values with kv_cache_scheme."
        )


def apply_attention_scheme(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], scheme: QuantizationScheme
) -> None:
    """Give ``modules`` (attention modules) ``scheme``'s input arguments for their queries, keys
    and values: the KV tap, ``q_scale`` (and zero point) shaped per attention head, and the
    query tap."""
    args = scheme.input_activations
    apply_kv_cache_scheme(model, args, modules)
    config = model.config.get_text_config(decoder=True)
    shape = (get_num_attn_heads(config), None, get_head_dim(config))
    for _, module in modules:
        module.quantization_scheme = QuantizationScheme(targets=scheme.targets, input_activations=args)
        dtype = next(module.parameters()).dtype
        initialize_qparams(module, "q", args, observed_shape=shape, observed_dtype=dtype, force_zero_point=False)
        if not hasattr(module, QUERY_HOOKS):
            setattr(module, QUERY_HOOKS, [])
    _tap_queries(model)


def has_query_tap(module: torch.nn.Module) -> bool:
    return hasattr(module, QUERY_HOOKS)


def register_query_hook(module: torch.nn.Module, hook: QueryHook) -> Callable[[], None]:
    """Call ``hook(module, queries)`` with the module's queries after RoPE on every call;
    returns the remover."""
    hooks: list[QueryHook] = getattr(module, QUERY_HOOKS)
    hooks.append(hook)
    return lambda: hooks.remove(hook)
