"""Turn a modifier's ``scheme`` / ``config_groups`` arguments into a compressed-tensors config."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
    is_preset_scheme,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.utils import is_match

logger = logging.getLogger(__name__)

SchemeArg = str | Mapping[str, Any] | None


def as_list(value: str | Iterable[str] | None) -> list[str]:
    """Targets and ignore patterns: one string or several, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def preset_names() -> list[str]:
    return sorted(PRESET_SCHEMES)


def _preset(name: str, targets: list[str]) -> QuantizationScheme:
    if not is_preset_scheme(name):
        raise ValueError(
            f"Unknown quantization scheme {name!r}. Use one of the presets "
            f"({', '.join(preset_names())}) or a dict of config groups."
        )
    return preset_name_to_scheme(name, targets)


def resolve_config_groups(
    scheme: SchemeArg,
    config_groups: Mapping[str, Any] | None,
    targets: str | Iterable[str] | None,
) -> dict[str, QuantizationScheme]:
    """Normalise the three ways a user may describe quantization into config groups.

    ``scheme`` may be a preset name (applied to ``targets``), a mapping of preset
    name to targets (``{"W4A16": ["Linear"]}``), or a mapping of group name to a
    scheme dict; ``config_groups`` is always the last form.
    """
    if scheme is not None and config_groups is not None:
        raise ValueError("Pass either scheme= or config_groups=, not both.")
    targets = as_list(targets) or ["Linear"]
    if scheme is None and config_groups is None:
        raise ValueError(
            "No quantization described: pass scheme= (e.g. 'W4A16') or config_groups=."
        )
    if isinstance(scheme, str):
        return {"group_0": _preset(scheme, targets)}
    groups: dict[str, QuantizationScheme] = {}
    source = scheme if scheme is not None else config_groups
    assert source is not None
    for index, (key, value) in enumerate(source.items()):
        if isinstance(value, QuantizationScheme):
            groups[key] = value
        elif isinstance(value, (str, list, tuple)) and is_preset_scheme(key):
            groups[f"group_{index}"] = _preset(key, as_list(value))
        elif isinstance(value, Mapping):
            body = dict(value)
            body.setdefault("targets", targets)
            try:
                groups[key] = QuantizationScheme.model_validate(body)
            except Exception as exc:  # pydantic's message names the bad field
                raise ValueError(f"Invalid quantization config group {key!r}: {exc}") from exc
        else:
            raise ValueError(
                f"Cannot read quantization scheme entry {key!r}: {value!r}. Expected a preset "
                "name mapped to targets, or a config group mapping."
            )
    return groups


_OBSERVED = {"weights": "weights", "input": "input_activations", "output": "output_activations"}


def apply_observer_overrides(
    groups: Mapping[str, QuantizationScheme],
    weight_observer: str | None = None,
    input_observer: str | None = None,
    output_observer: str | None = None,
    observer: Mapping[str, str] | None = None,
) -> None:
    """Set a modifier's observer arguments on every group, as llm-compressor 0.14 does:
    the individual names or the ``observer`` dict (keys ``weights``, ``input``, ``output``),
    not both; an unset one leaves each scheme's own ``observer`` (or the default)."""
    individual = {"weights": weight_observer, "input": input_observer, "output": output_observer}
    if observer is not None:
        if any(v is not None for v in individual.values()):
            raise ValueError(
                "Pass either weight_observer/input_observer/output_observer or observer={...}, not both."
            )
        if not isinstance(observer, Mapping) or not set(observer) <= set(_OBSERVED):
            raise ValueError(
                f"observer must be a dict with keys among {sorted(_OBSERVED)}, got {observer!r}."
            )
        individual = {key: observer.get(key) for key in _OBSERVED}
    for scheme in groups.values():
        for key, name in individual.items():
            args = getattr(scheme, _OBSERVED[key])
            if name is not None and args is not None:
                args.observer = name


def validate_observers(config: QuantizationConfig) -> None:
    """Fail while the recipe is read when a scheme names an observer no plugin provides."""
    from llmc.plugins import get_registry
    from llmc.quantization.observers import observer_name

    registry = get_registry()
    values: list[tuple[str, QuantizationArgs | None]] = [("k", config.kv_cache_scheme)]
    for scheme in config.config_groups.values():
        values += [("weight", scheme.weights), ("input", scheme.input_activations)]
        values += [("output", scheme.output_activations)]
    for base, args in values:
        if args is not None and not (base != "weight" and args.dynamic is True):
            registry.get("observer", observer_name(args, base))


def build_config(
    groups: Mapping[str, QuantizationScheme],
    ignore: Iterable[str],
    kv_cache_scheme: Mapping[str, Any] | None = None,
) -> QuantizationConfig:
    return QuantizationConfig(
        config_groups=dict(groups),
        ignore=list(ignore),
        kv_cache_scheme=(QuantizationArgs.model_validate(kv_cache_scheme) if kv_cache_scheme else None),
    )


def needs_calibration(args: QuantizationArgs | None) -> bool:
    """Static activation quantization (and static global scales) need observed data."""
    return args is not None and args.dynamic is not True


def scheme_needs_data(scheme: QuantizationScheme) -> bool:
    return needs_calibration(scheme.input_activations) or needs_calibration(
        scheme.output_activations
    )


def warn_unmatched(model: torch.nn.Module, targets: Iterable[str], ignore: Iterable[str]) -> None:
    """A target or ignore pattern that matches no module is almost always a typo."""
    modules = list(model.named_modules())
    for kind, patterns in (("target", targets), ("ignore", ignore)):
        for pattern in patterns:
            if not any(is_match(name, module, pattern) for name, module in modules):
                logger.warning(
                    "%s pattern %r matches no module of %s; check the spelling "
                    "(module names, class names, or 're:' regexes).",
                    kind,
                    pattern,
                    type(model).__name__,
                )


@contextlib.contextmanager
def accurate_match_warnings() -> Iterator[None]:
    """Silence compressed-tensors' "Could not match" warnings for the block: it names a target
    as unmatched when an earlier target of the list matched its modules first (a regex after
    ``Linear``); :func:`warn_unmatched` says which patterns really match nothing."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Could not match")

    match_logger = logging.getLogger("compressed_tensors.utils.match")
    match_logger.addFilter(keep)
    try:
        yield
    finally:
        match_logger.removeFilter(keep)


def check_targets_select(
    model: torch.nn.Module, targets: list[str], ignore: list[str], who: str, allow: bool
) -> None:
    """Refuse targets that, less ``ignore``, select no module: the checkpoint would come out
    unquantized (a warning instead where the caller allows it)."""
    from compressed_tensors.utils import match_named_modules

    if not targets or next(iter(match_named_modules(model, targets, ignore)), None) is not None:
        return
    weighted = [
        (n, m) for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
        and not isinstance(m, torch.nn.Embedding)
    ]
    classes = sorted({type(m).__name__ for _, m in weighted})
    message = (
        f"{who}'s targets {targets} (ignore {ignore}) select no module of {type(model).__name__}: "
        f"nothing would be quantized. Its classes with weight matrices are {', '.join(classes) or 'none'}; "
        f"module names look like {weighted[0][0] if weighted else '?'}."
    )
    if not allow:
        raise ValueError(message + " Fix targets or ignore, or pass allow_unmatched_targets=True to run anyway.")
    logger.warning(message)


def warn_overlapping_groups(model: torch.nn.Module, config: QuantizationConfig) -> None:
    """A module two config groups target gets one scheme (compressed-tensors takes the most
    specific target: exact name, then regex, then class): say which, once per pair of groups."""
    from compressed_tensors.utils import match_named_modules, match_targets

    group_of = {t: name for name, scheme in config.config_groups.items() for t in scheme.targets}
    if len(set(group_of.values())) < 2:
        return
    seen: set[tuple[str, ...]] = set()
    for name, module in match_named_modules(model, list(group_of), config.ignore):
        targets = match_targets(name, module, list(group_of))
        groups = tuple(dict.fromkeys(group_of[t] for t in targets))
        if len(groups) > 1 and groups not in seen:
            seen.add(groups)
            logger.warning(
                "%s (and any other module both match) is targeted by config groups %s; it gets %r's "
                "scheme (its target %r is the most specific). Narrow the targets if that is not meant.",
                name, ", ".join(map(repr, groups)), groups[0], targets[0],
            )


def check_weight_shape(name: str, shape: tuple[int, ...], args: QuantizationArgs) -> None:
    """Fail before any work when a weight cannot be split into the scheme's groups."""
    if 0 in shape:
        raise ValueError(
            f"{name}: its weight is empty (shape {list(shape)}), which no scheme can quantize or "
            "transformers reload quantized. Add it to ignore, or fix the model's config."
        )
    cols = shape[-1]
    size = None
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        size = args.group_size
    elif args.strategy == QuantizationStrategy.BLOCK:
        size = args.block_structure[-1]
    if size and cols % size:
        raise ValueError(
            f"{name}: input dimension {cols} is not divisible by the scheme's "
            f"group/block size {size}. Add {name!r} to ignore, or choose a smaller "
            "group size."
        )
    if args.type == QuantizationType.FLOAT and args.num_bits == 4 and not args.symmetric:
        raise ValueError("Asymmetric FP4 quantization is not supported.")


def validate_shapes(model: torch.nn.Module, config: QuantizationConfig) -> None:
    """Check every targeted Linear's weight against its scheme (see :func:`check_weight_shape`)."""
    from compressed_tensors.utils import match_named_modules

    for scheme in config.config_groups.values():
        if scheme.weights is None:
            continue
        for name, module in match_named_modules(model, scheme.targets, config.ignore):
            if isinstance(module, torch.nn.Linear):
                check_weight_shape(name, tuple(module.weight.shape), scheme.weights)
