"""Entry-point plugin: registers AutoRoundModifier."""

from __future__ import annotations

from llmc.api import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_autoround.modifier import AutoRoundModifier

    register(AutoRoundModifier)
