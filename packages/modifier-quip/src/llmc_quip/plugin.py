"""Entry-point plugin: registers QuIPModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_quip.modifier import QuIPModifier

    register(QuIPModifier)
