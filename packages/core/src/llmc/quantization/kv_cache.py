"""KV-cache quantization: calibrated key and value scales on each attention module.

vLLM reads a checkpoint's ``kv_cache_scheme`` and each attention module's
``k_scale`` / ``v_scale`` (``model.layers.N.self_attn.k_scale``), the scales of the
keys after RoPE and of the values, per tensor or per KV head. compressed-tensors
names and shapes these parameters; llmc sees the states through a stand-in for
the attention module's cache argument (the one place every transformers
attention hands over its keys and values after RoPE), whatever transformers calls
that argument (``past_key_values`` until 5.2x, ``cache`` since), and fake-quantizes
them there, as the cache would hold them.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
from compressed_tensors.utils import get_head_dim, get_num_kv_heads

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
_KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_b_proj")
TAP_ATTRIBUTE = "llmc_kv_cache"
QUERY_HOOKS = "llmc_query_hooks"  # on modules whose queries are quantized too (llmc.quantization.attention)

StateHook = Callable[[torch.nn.Module, torch.Tensor], None]


def cache_argument(module: torch.nn.Module) -> str | None:
    """The name under which ``module.forward`` takes the KV cache, if it takes one."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in _CACHE_ARGUMENTS if name in parameters), None)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The attention modules whose keys and values a KV cache holds: an ``...Attention``
    class with key/value projections and a cache argument."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if "attention" in type(module).__name__.lower()
        and any(hasattr(module, p) for p in _KV_PROJECTIONS)
        and cache_argument(module) is not None
    ]


class KVCacheTap:
    """Stands in for an attention module's cache during its forward: ``update`` gets the
    keys (after RoPE) and values, runs the observers' hooks, fake-quantizes them with the
    module's k/v scales, and hands them to the real cache, if any."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = weakref.ref(module)
        self.argument = cache_argument(module)  # read once: the hook below runs every forward
        self.hooks: dict[str, list[StateHook]] = {"k": [], "v": []}
        self.cache: Any = None

    def register(self, base: str, hook: StateHook) -> Callable[[], None]:
        """Call ``hook(module, states)`` on every ``base`` ('k' or 'v') states; returns the remover."""
        self.hooks[base].append(hook)
        return lambda: self.hooks[base].remove(hook)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        module = self._module()
        assert module is not None
        states = {"k": key_states, "v": value_states}
        args_ = module.quantization_scheme.input_activations
        for base in ("k", "v"):
            for hook in self.hooks[base]:
                hook(module, states[base])
            if getattr(module, "quantization_enabled", True):
                states[base] = forward_quantize(module, states[base], base, args_)
        cache, self.cache = self.cache, None
        if cache is not None:
            return cache.update(states["k"], states["v"], *args, **kwargs)
        return states["k"], states["v"]

    def __getattr__(self, name: str) -> Any:
        # a model that reads its cache's other attributes reads the real one's
        cache = self.__dict__.get("cache")
        if cache is not None and not name.startswith("__"):
            return getattr(cache, name)
        raise AttributeError(name)


def _substitute_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    tap: KVCacheTap = getattr(module, TAP_ATTRIBUTE)
    tap.cache = kwargs.get(tap.argument)
    kwargs[tap.argument] = tap
    return args, kwargs


def apply_kv_cache_scheme(
    model: torch.nn.Module, args: QuantizationArgs, modules: list[tuple[str, torch.nn.Module]] | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """Give every attention module (or those of ``modules``) ``args`` for its keys and values:
    the scheme and the ``k_scale``/``v_scale`` (and zero point) compressed-tensors defines, and
    the tap."""
    modules = attention_modules(model) if modules is None else modules
    if not modules:
        raise ValueError(
            f"kv_cache_scheme: {type(model).__name__} has no attention module with key/value "
            "projections and a cache argument to quantize the KV cache of."
        )
    config = model.config.get_text_config(decoder=True)
    shape = (get_num_kv_heads(config), None, get_head_dim(config))
    for name, module in modules:
        module.quantization_scheme = QuantizationScheme(targets=[name], input_activations=args)
        dtype = next(module.parameters()).dtype
        for base in ("k", "v"):
            initialize_qparams(module, base, args, observed_shape=shape, observed_dtype=dtype, force_zero_point=False)
        if not hasattr(module, TAP_ATTRIBUTE):
            setattr(module, TAP_ATTRIBUTE, KVCacheTap(module))
            module.register_forward_pre_hook(_substitute_cache, with_kwargs=True)
        module.quantization_status = QuantizationStatus.INITIALIZED
    return modules


def kv_cache_tap(module: torch.nn.Module) -> KVCacheTap | None:
    return getattr(module, TAP_ATTRIBUTE, None)


@contextlib.contextmanager
def kv_schemes_set_aside(model: torch.nn.Module) -> Iterator[list[tuple[QuantizationScheme, bool]]]:
    """Take the attention modules' schemes off them for the block, and yield the distinct
    ones, each with whether its modules' queries are quantized too (empty without a KV or
    attention scheme). compressed-tensors' config inference recognises attention modules by
    transformers' argument name of the day and would otherwise take one for a quantized
    layer; the saver writes them into the config itself (:func:`with_attention_schemes`)."""
    modules = [m for m in model.modules() if kv_cache_tap(m) is not None]
    schemes = [m.__dict__.pop("quantization_scheme") for m in modules]
    distinct: dict[str, tuple[QuantizationScheme, bool]] = {}
    for module, scheme in zip(modules, schemes, strict=True):
        queries = hasattr(module, QUERY_HOOKS)
        # a KV scheme names its module; an attention group's scheme, the group's targets
        key = (scheme if queries else scheme.input_activations).model_dump_json() + str(queries)
        distinct.setdefault(key, (scheme, queries))
    try:
        yield list(distinct.values())
    finally:
        for module, scheme in zip(modules, schemes, strict=True):
            module.quantization_scheme = scheme


def with_attention_schemes(
    config: QuantizationConfig | None, schemes: list[tuple[QuantizationScheme, bool]]
) -> QuantizationConfig:
    """``config`` with the attention modules' schemes (:func:`kv_schemes_set_aside`): their
    arguments as ``kv_cache_scheme`` (an attention group's, if any, as llm-compressor writes
    it), and a config group for each scheme that quantizes queries too (the recipe's attention
    config group, with its targets); a recipe that quantizes nothing else gets a config of its
    own."""
    if config is None:
        config = QuantizationConfig(config_groups={}, quantization_status=QuantizationStatus.FROZEN, format="dense")
    config.kv_cache_scheme = max(schemes, key=lambda entry: entry[1])[0].input_activations
    for scheme, queries in schemes:
        if queries:
            group = scheme.model_copy(update={"format": "dense"})
            config.config_groups[f"group_{len(config.config_groups)}"] = group
    return config
