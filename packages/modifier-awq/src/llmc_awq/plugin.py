"""Entry-point plugin: registers AWQModifier and its default mappings."""

from __future__ import annotations

from llmc.api import (
    DENSE_ARCHITECTURES,
    Mapping,
    hookimpl,
    inner_mappings,
    norm_mappings,
    phi3_norm_mappings,
)


@hookimpl
def llmc_register_modifiers(register):
    from llmc_awq.modifier import AWQModifier

    register(AWQModifier)


@hookimpl
def llmc_register_mappings(register):
    """The norms' projections, and the linear pairs inside a layer (v -> o, up -> down)."""
    for architecture in DENSE_ARCHITECTURES:
        register("awq", architecture, [*norm_mappings(), *inner_mappings()])
    register("awq", "Phi3ForCausalLM", [*phi3_norm_mappings(), Mapping("re:.*gate_up_proj", ["re:.*down_proj"])])
