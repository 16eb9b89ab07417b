"""Entry-point plugin: registers SmoothQuantModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_smoothquant.modifier import SmoothQuantModifier

    register(SmoothQuantModifier)
