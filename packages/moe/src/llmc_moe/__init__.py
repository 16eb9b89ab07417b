"""llmc-moe: MoE models compressed whole.

transformers 5 holds MoE experts as fused 3-D parameters that no ``Linear``
target reaches. This plugin replaces each fused experts module by
:class:`LinearExperts` (one ``nn.Linear`` per expert and projection, same
forward), routes every calibration token through every expert when
``moe_calibrate_all_experts`` is set, registers the MoE families' smooth/balance
mappings, and splits fused expert tensors of checkpoints for ``model_free_ptq``.
"""

from __future__ import annotations

from llmc_moe.experts import ExpertMLP, LinearExperts
from llmc_moe.layout import FusedLayout, ProjectionNames, projection_names
from llmc_moe.linearize import ADAPTERS, Adapter, fused_experts, linear_experts, linearize
from llmc_moe.patch import MoEPatch

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ExpertMLP",
    "FusedLayout",
    "LinearExperts",
    "MoEPatch",
    "ProjectionNames",
    "fused_experts",
    "linear_experts",
    "linearize",
    "projection_names",
]
