"""Entry-point plugin: registers GPTQModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_gptq.modifier import GPTQModifier

    register(GPTQModifier)
