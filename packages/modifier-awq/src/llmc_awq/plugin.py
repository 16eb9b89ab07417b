"""Entry-point plugin: registers AWQModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_awq.modifier import AWQModifier

    register(AWQModifier)
