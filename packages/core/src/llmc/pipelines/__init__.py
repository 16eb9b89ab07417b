"""Calibration pipelines: how forward passes drive the modifier lifecycle.

A pipeline is a callable ``run(state, modifiers)`` registered under a name
through ``llmc_register_pipelines``. It owns the whole lifecycle of the
modifiers it is given (see :func:`llmc.lifecycle.lifecycle`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs

from llmc.plugins import get_registry

if TYPE_CHECKING:
    from llmc.lifecycle import State
    from llmc.modifiers.base import Modifier


@attrs.frozen
class Pipeline:
    """A registered pipeline: ``run(state, modifiers)`` drives the modifiers' lifecycle;
    ``requires_data`` says whether it runs forward passes over calibration data (oneshot
    refuses, before loading the model, to run one without data)."""

    run: Callable[[State, Sequence[Modifier]], None]
    requires_data: bool = True


def run_pipeline(name: str, state: State, modifiers: Sequence[Modifier]) -> None:
    """Run the registered pipeline ``name`` over ``modifiers``."""
    get_registry().get("pipeline", name).run(state, list(modifiers))


def resolve_pipelines(name: str, modifiers: Sequence[Modifier]) -> list[str]:
    """The concrete pipelines a stage will run, so they can be checked before any work."""
    if name == "independent":
        return [m.pipeline() for m in modifiers]
    return [name]
