"""Entry-point plugin: registers SpinQuantModifier."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc_spinquant.modifier import SpinQuantModifier

    register(SpinQuantModifier)
