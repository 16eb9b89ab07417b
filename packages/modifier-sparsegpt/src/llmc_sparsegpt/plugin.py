"""Entry-point plugin: registers SparseGPTModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_sparsegpt.modifier import SparseGPTModifier

    register(SparseGPTModifier)
