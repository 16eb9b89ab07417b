"""The ``independent`` pipeline (default): each modifier runs the pipeline it asks for."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llmc.lifecycle import State
from llmc.modifiers.base import Modifier
from llmc.pipelines import run_pipeline

logger = logging.getLogger(__name__)


def run_independent(state: State, modifiers: Sequence[Modifier]) -> None:
    for modifier in modifiers:
        name = modifier.pipeline()
        logger.info("%s: running the %r pipeline", type(modifier).__name__, name)
        run_pipeline(name, state, [modifier])
