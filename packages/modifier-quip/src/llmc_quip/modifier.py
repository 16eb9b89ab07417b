"""QuIPModifier: Hadamard rotations of the Linear layers' inputs, before quantization."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

from llmc import transforms
from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc.quantization.config import as_list

logger = logging.getLogger(__name__)




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

    rotations: list[str] = attrs.field(factory=lambda: ["v"], converter=transforms.rotation_names(("v", "u")))
    transform_type: str = attrs.field(default="random-hadamard", validator=attrs.validators.in_(transforms.TRANSFORM_TYPES))
    targets: list[str] = attrs.field(factory=lambda: ["Linear"], converter=as_list)
    randomize: bool = attrs.field(default=False, validator=transforms.refuse_true)
    learnable: bool = attrs.field(default=False, validator=transforms.refuse_true)
    # float64 where the device has it (llm-compressor's default; MPS has not)
    precision: str | None = None
    transform_block_size: int | None = None
    ignore: list[str] = attrs.field(factory=lambda: ["lm_head"], converter=as_list)
    transform_config: Any = attrs.field(default=None, converter=transforms.as_transform_config)

    def on_initialize(self, state: State) -> None:
        config = self.transform_config or self.build_config(state.device)
        model = state.model
        hidden = model.config.get_text_config(decoder=True).hidden_size
        if self.transform_block_size is not None and hidden % self.transform_block_size:
            raise ValueError(
                f"transform_block_size {self.transform_block_size} does not divide the hidden size {hidden}."
            )
        transforms.apply_transforms(model, config)
        logger.info("QuIP: %s rotations %s applied", self.transform_type, "+".join(self.rotations))

    def build_config(self, device: torch.device) -> TransformConfig:
        """The transform config the arguments describe: per rotation, an online transform of
        the inputs (outputs) and its inverse fused into the weights."""
        precision = self.precision or transforms.default_precision(device)
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

