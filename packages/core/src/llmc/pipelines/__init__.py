"""Calibration pipelines: how forward passes drive the modifier lifecycle.

A pipeline is a callable ``run(state, modifiers)`` registered under a name
through ``llmc_register_pipelines``. It owns the whole lifecycle of the
modifiers it is given (see :func:`llmc.lifecycle.lifecycle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from llmc.plugins import get_registry

if TYPE_CHECKING:
    from llmc.lifecycle import State
    from llmc.modifiers.base import Modifier


def run_pipeline(name: str, state: State, modifiers: Sequence[Modifier]) -> None:
    """Run the registered pipeline ``name`` over ``modifiers``."""
    get_registry().get("pipeline", name)(state, list(modifiers))


def resolve_pipelines(name: str, modifiers: Sequence[Modifier]) -> list[str]:
    """The concrete pipelines a stage will run, so they can be checked before any work."""
    if name == "independent":
        return [m.pipeline() for m in modifiers]
    return [name]
