"""Entry-point plugin: registers REAPPruningModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_reap.modifier import REAPPruningModifier

    register(REAPPruningModifier)
