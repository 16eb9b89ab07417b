"""The ``datafree`` pipeline: the lifecycle without a single forward pass."""

from __future__ import annotations

from collections.abc import Sequence

from llmc.lifecycle import State, lifecycle
from llmc.modifiers.base import Modifier


def run_datafree(state: State, modifiers: Sequence[Modifier]) -> None:
    with lifecycle(state, modifiers) as hook:
        hook.llmc_calibration_start(state=state)
        hook.llmc_calibration_end(state=state)

