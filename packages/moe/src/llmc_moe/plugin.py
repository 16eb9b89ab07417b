"""Entry-point plugin: the MoE model patch and the MoE families' default mappings."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_model_patches(register):
    from llmc_moe.patch import MoEPatch

    register(MoEPatch())


@hookimpl
def llmc_register_mappings(register):
    from llmc_moe.mappings import builtin_moe_mappings

    for architecture, mappings in builtin_moe_mappings().items():
        register(architecture, mappings)
