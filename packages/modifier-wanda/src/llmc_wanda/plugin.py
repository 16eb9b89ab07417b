"""Entry-point plugin: registers WandaPruningModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_wanda.modifier import WandaPruningModifier

    register(WandaPruningModifier)
