"""Entry-point plugin: registers SmoothQuantModifier (and LogarithmicEqualizationModifier) and its default mappings."""

from __future__ import annotations

from llmc.api import DENSE_ARCHITECTURES, hookimpl, norm_mappings, phi3_norm_mappings


@hookimpl
def llmc_register_modifiers(register):
    from llmc_smoothquant.modifier import LogarithmicEqualizationModifier, SmoothQuantModifier

    register(SmoothQuantModifier)
    register(LogarithmicEqualizationModifier)


@hookimpl
def llmc_register_mappings(register):
    """Each norm and the projections it feeds (the activation outliers SmoothQuant moves)."""
    for architecture in DENSE_ARCHITECTURES:
        register("smoothquant", architecture, norm_mappings())
    register("smoothquant", "Phi3ForCausalLM", phi3_norm_mappings())
