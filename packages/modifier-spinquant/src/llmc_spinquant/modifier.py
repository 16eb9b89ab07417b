"""SpinQuantModifier: rotations of the residual stream and attention heads before quantization."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch
from compressed_tensors import match_named_modules
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
from compressed_tensors.utils import get_head_dim

from llmc import transforms
from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc_spinquant.mappings import (
    NormMapping,
    SpinQuantMapping,
    as_mapping,
    as_norm_mappings,
    for_model,
)

logger = logging.getLogger(__name__)

ROTATIONS = ("R1", "R2", "R3", "R4")


@attrs.define(kw_only=True)
class SpinQuantModifier(Modifier):
    """SpinQuant's rotations (Liu et al., 2024), with fixed Hadamard matrices as QuaRot:
    R1 rotates the residual stream (the embedding and every module writing the residual,
    inverse into every module reading it), R2 each head's values and the attention output,
    both fused into the weights; R3 (queries and keys) and R4 (the MLP output's input) run
    online. The model's function is unchanged, and a quantizing modifier after it sees
    weights and activations with fewer outliers.

    Each norm's scale is folded into the Linears it feeds first (a rotation commutes with
    RMSNorm's normalization, not with its scale). compressed-tensors builds, applies and
    serializes the transforms. The arguments are llm-compressor 0.14's.
    """

    rotations: list[str] = attrs.field(factory=lambda: ["R1", "R2"], converter=transforms.rotation_names(ROTATIONS))
    transform_type: str = attrs.field(default="hadamard", validator=attrs.validators.in_(transforms.TRANSFORM_TYPES))
    randomize: bool = attrs.field(default=False, validator=transforms.refuse_true)
    learnable: bool = attrs.field(default=False, validator=transforms.refuse_true)
    precision: str | None = None  # float64 where the device has it (MPS has not)
    transform_block_size: int | None = None
    mappings: Any = attrs.field(default=None, converter=as_mapping)
    norm_mappings: Any = attrs.field(default=None, converter=as_norm_mappings)
    transform_config: Any = attrs.field(default=None, converter=transforms.as_transform_config)

    @torch.no_grad()
    def on_initialize(self, state: State) -> None:
        model = state.model
        default_mapping, default_norms = for_model(model)
        mapping: SpinQuantMapping = self.mappings or default_mapping
        norms: list[NormMapping] = self.norm_mappings or default_norms
        config = self.transform_config or self.build_config(model, mapping, state.device)
        if self.transform_config is None:
            if "R3" in self.rotations:
                _check_attention_hooks(model, mapping)
            if "R1" in self.rotations:
                _check_residual_readers(model, config)
        transforms.untie_embeddings(model)  # before folding the final norm into the head
        for norm_mapping in norms:
            _fold_norms(model, norm_mapping)
        transforms.apply_transforms(model, config)
        logger.info("SpinQuant: %s rotations %s applied", self.transform_type, "+".join(self.rotations))

    def build_config(self, model: torch.nn.Module, mapping: SpinQuantMapping, device: torch.device) -> TransformConfig:
        precision = self.precision or transforms.default_precision(device)
        head_dim = mapping.attn_head_dim or get_head_dim(model.config.get_text_config(decoder=True))

        def scheme(block: int | None, *apply: TransformArgs) -> TransformScheme:
            return TransformScheme(type=self.transform_type, head_dim=block, apply=list(apply), precision=precision)

        block = self.transform_block_size
        m = mapping
        schemes = {
            "R1": lambda: scheme(
                block,
                TransformArgs(targets=[m.embedding, m.attn_o, *m.mlp_out], location="weight_output"),
                TransformArgs(targets=[m.attn_q, m.attn_k, m.attn_v, *m.mlp_in, m.lm_head], location="weight_input", inverse=True),
            ),
            "R2": lambda: scheme(
                head_dim,
                TransformArgs(targets=[m.attn_v], location="weight_output"),
                TransformArgs(targets=[m.attn_o], location="weight_input", inverse=True),
            ),
            "R3": lambda: scheme(
                head_dim,
                TransformArgs(targets=[m.attn], location="q_attn"),
                TransformArgs(targets=[m.attn], location="k_cache"),
            ),
            "R4": lambda: scheme(
                block,
                TransformArgs(targets=list(m.mlp_out), location="input"),
                TransformArgs(targets=list(m.mlp_out), location="weight_input", inverse=True),
            ),
        }
        return TransformConfig(config_groups={r: schemes[r]() for r in ROTATIONS if r in self.rotations})


def _check_attention_hooks(model: torch.nn.Module, mapping: SpinQuantMapping) -> None:
    """R3 rotates queries and keys inside the attention, through compressed-tensors' attention
    hooks, which recognise attention modules by transformers' cache argument of the day."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    for name, module in match_named_modules(model, [mapping.attn]):
        if not is_cached_attention_module(module):
            raise ValueError(
                f"R3 rotates queries and keys through compressed-tensors' attention hooks, which do not "
                f"recognise {name} ({type(module).__name__}) with this transformers; use rotations R1, R2, R4."
            )


def _check_residual_readers(model: torch.nn.Module, config: TransformConfig) -> None:
    """R1 is fused into the Linears that read the residual stream. A module that reads it with a
    weight matrix of its own (an MoE router such as Qwen3-MoE's or Cohere2-MoE's) would keep
    reading unrotated weights, and route tokens elsewhere: refused, before anything changes."""
    hidden = model.config.get_text_config(decoder=True).hidden_size
    rotated = {
        id(module)
        for args in config.config_groups["R1"].apply
        for _, module in match_named_modules(model, args.targets, args.ignore)
    }
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (
            weight is not None
            and weight.dim() == 2
            and weight.shape[-1] == hidden
            and id(module) not in rotated
            and not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        ):
            raise ValueError(
                f"SpinQuant's R1 rotates the residual stream, but {name} ({type(module).__name__}) reads it "
                "with a weight matrix R1 is not fused into: it would route tokens differently. For "
                "Cohere2-MoE call llmc.modeling.moe.cohere2_moe.prepare_cohere2_moe_for_spinquant(model) "
                "before oneshot; otherwise leave R1 out of the rotations."
            )


def _fold_norms(model: torch.nn.Module, mapping: NormMapping) -> None:
    """Multiply the Linears ``mapping`` names (inside each norm's parent) by the norm's scale,
    in float64, and set the scale to one."""
    for norm_name, norm in match_named_modules(model, [mapping.norm]):
        if getattr(norm, "bias", None) is not None or isinstance(norm, torch.nn.LayerNorm):
            raise ValueError(
                f"SpinQuant needs RMS norms: {norm_name} ({type(norm).__name__}) subtracts a mean or adds a bias."
            )
        # the Linears it feeds: inside its parent (its decoder layer), else anywhere (the head)
        parent_name = norm_name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        linears = [m for _, m in match_named_modules(parent, mapping.linears) if isinstance(m, torch.nn.Linear)]
        if not linears:
            linears = [m for _, m in match_named_modules(model, mapping.linears) if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError(f"SpinQuant: no Linear of {mapping.linears} follows {norm_name}.")
        transforms.fuse_norm_linears(norm, linears)
