"""What rotation (transform) modifiers share: llm-compressor 0.14's transform arguments, and
applying a compressed-tensors transform config to a model.

compressed-tensors owns the transforms: it builds the matrices, fuses weight transforms, hooks
online ones and serializes ``transform_config``. A modifier (QuIP, SpinQuant, a plugin's) only
describes them; these helpers do the rest the same way for each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
from compressed_tensors.transform import TransformConfig, apply_transform_config
from compressed_tensors.utils import match_named_modules

TRANSFORM_TYPES = ("hadamard", "random-hadamard", "random-matrix")


def rotation_names(allowed: tuple[str, ...]) -> Callable[[str | list[str]], list[str]]:
    """A converter to a non-empty list of ``allowed`` names, in their case whatever the recipe's."""

    def convert(value: str | list[str]) -> list[str]:
        canonical = {name.lower(): name for name in allowed}
        given = [value] if isinstance(value, str) else list(value)
        if not given or any(str(v).lower() not in canonical for v in given):
            raise ValueError(f"rotations must name some of {', '.join(allowed)}, got {value!r}.")
        return [canonical[str(v).lower()] for v in given]

    return convert


def refuse_true(instance: Any, attribute: attrs.Attribute, value: bool) -> None:
    """For 0.14's ``randomize`` and ``learnable``, which neither it nor llmc implements."""
    if value:
        raise NotImplementedError(f"{attribute.name}=True is not supported (nor by llm-compressor 0.14).")


def as_transform_config(value: Any) -> TransformConfig | None:
    """A recipe's ``transform_config`` (YAML data or the object) as compressed-tensors'."""
    return value if value is None or isinstance(value, TransformConfig) else TransformConfig.model_validate(value)


def default_precision(device: torch.device) -> str:
    """llm-compressor's: float64 where the device has it (MPS has not)."""
    return "float32" if device.type == "mps" else "float64"


def untie_embeddings(model: torch.nn.Module) -> None:
    """Give the output embedding a weight of its own, so a transform fused into one leaves the
    other as it was (and the config says they are no longer tied)."""
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=False)
        model.config.get_text_config(decoder=True).tie_word_embeddings = False


def apply_transforms(model: torch.nn.Module, config: TransformConfig) -> None:
    """Apply ``config`` to ``model`` (compressed-tensors), untying the embeddings first when a
    transform touches either of them."""
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    if any(
        module in embeddings
        for scheme in config.config_groups.values()
        for args in scheme.apply
        for _, module in match_named_modules(model, args.targets, args.ignore)
    ):
        untie_embeddings(model)
    apply_transform_config(model, config)


@torch.no_grad()
def fuse_norm_linears(norm: torch.nn.Module, linears: Iterable[torch.nn.Linear]) -> None:
    """Fold ``norm``'s scale into the Linears that read its output, in float64, and set the scale
    to one: a rotation commutes with RMSNorm's normalization, not with its scale. The
    function is unchanged (llm-compressor's ``llmcompressor.modeling.fuse_norm_linears``)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"Cannot fuse norm of type {type(norm).__name__}: it has no weight.")
    scale = weight.detach().double()
    for linear in linears:
        linear.weight.copy_((linear.weight.double() * scale.to(linear.weight.device)).to(linear.weight.dtype))
    weight.fill_(1.0)


@torch.no_grad()
def center_embeddings(embedding: torch.nn.Module) -> None:
    """Shift each embedding row to zero mean, in float64 (llm-compressor's
    ``center_embeddings``; its SpinQuant does this, llmc's does not: it changes the model)."""
    weight = getattr(embedding, "weight", None)
    if weight is None:
        raise ValueError(f"Cannot center embeddings of type {type(embedding).__name__}: it has no weight.")
    centered = weight.double() - weight.double().mean(dim=-1, keepdim=True)
    weight.copy_(centered.to(weight.dtype))
