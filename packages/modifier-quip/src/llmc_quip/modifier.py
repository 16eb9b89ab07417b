"""QuIPModifier: Hadamard rotations of the Linear layers' inputs, before quantization."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformScheme,
    apply_transform_config,
)

from llmc.lifecycle import State
from llmc.modifiers.base import Modifier

logger = logging.getLogger(__name__)

ROTATIONS = ("v", "u")
TRANSFORM_TYPES = ("hadamard", "random-hadamard", "random-matrix")


def _str_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _rotations(value: str | list[str]) -> list[str]:
    rotations = [r.lower() for r in _str_list(value)]
    unknown = [r for r in rotations if r not in ROTATIONS]
    if unknown or not rotations:
        raise ValueError(f"rotations must name 'v' (inputs) and/or 'u' (outputs), got {value!r}.")
    return rotations


def _not_yet(instance: Any, attribute: attrs.Attribute, value: bool) -> None:
    if value:
        raise NotImplementedError(f"{attribute.name}=True is not supported (nor by llm-compressor 0.14).")


def _transform_config(value: Any) -> TransformConfig | None:
    return value if value is None or isinstance(value, TransformConfig) else TransformConfig.model_validate(value)


@attrs.define(kw_only=True)
class QuIPModifier(Modifier):
    """QuIP / QuIP# incoherence processing (Chee et al., 2023; Tseng et al., 2024): each targeted
    Linear's inputs are rotated by a Hadamard matrix at run time and its weight by the inverse,
    fused in (``rotations: [v]``; ``u`` does the same on the output side), so the weights
    quantized after it have fewer outliers and the model's function is unchanged.

    compressed-tensors builds, applies and serializes the transforms (``transform_config`` in
    the checkpoint, which vLLM reads); the arguments are llm-compressor 0.14's. Data-free: put a
    quantizing modifier after it.
    """

    rotations: list[str] = attrs.field(factory=lambda: ["v"], converter=_rotations)
    transform_type: str = attrs.field(default="random-hadamard", validator=attrs.validators.in_(TRANSFORM_TYPES))
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=_str_list)
    randomize: bool = attrs.field(default=False, validator=_not_yet)
    learnable: bool = attrs.field(default=False, validator=_not_yet)
    # float64 where the device has it (llm-compressor's default; MPS has not)
    precision: str | None = None
    transform_block_size: int | None = None
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=_str_list)
    transform_config: Any = attrs.field(default=None, converter=_transform_config)

    def on_initialize(self, state: State) -> None:
        config = self.transform_config or self.build_config(state.device)
        model = state.model
        hidden = model.config.get_text_config(decoder=True).hidden_size
        if self.transform_block_size is not None and hidden % self.transform_block_size:
            raise ValueError(
                f"transform_block_size {self.transform_block_size} does not divide the hidden size {hidden}."
            )
        if _targets_embeddings(model, config):
            _untie_embeddings(model)
        apply_transform_config(model, config)
        logger.info("QuIP: %s rotations %s applied", self.transform_type, "+".join(self.rotations))

    def build_config(self, device: torch.device) -> TransformConfig:
        """The transform config the arguments describe: per rotation, an online transform of
        the inputs (outputs) and its inverse fused into the weights."""
        precision = self.precision or ("float32" if device.type == "mps" else "float64")
        sides = {"v": ("input", "weight_input"), "u": ("weight_output", "output")}
        groups = {}
        for rotation in self.rotations:
            first, second = sides[rotation]
            groups[rotation] = TransformScheme(
                type=self.transform_type,
                head_dim=self.transform_block_size,
                apply=[
                    TransformArgs(targets=self.targets, location=first, ignore=self.ignore),
                    TransformArgs(targets=self.targets, location=second, inverse=True, ignore=self.ignore),
                ],
                precision=precision,
            )
        return TransformConfig(config_groups=groups)


def _targets_embeddings(model: torch.nn.Module, config: TransformConfig) -> bool:
    from compressed_tensors.utils import match_named_modules

    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    return any(
        module in embeddings
        for scheme in config.config_groups.values()
        for args in scheme.apply
        for _, module in match_named_modules(model, args.targets, args.ignore)
    )


def _untie_embeddings(model: torch.nn.Module) -> None:
    """Give the output embedding a weight of its own: a transform fused into one must not
    change the other."""
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=False)
        model.config.get_text_config(decoder=True).tie_word_embeddings = False
