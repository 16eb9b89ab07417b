"""The ``basic`` pipeline: one shared set of full-model forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from llmc.lifecycle import State, lifecycle, pop_loss_mask
from llmc.modifiers.base import Modifier
from llmc.quantization.calibrate import quantization_disabled


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``. To CUDA, CPU tensors are copied through pinned memory
    without waiting: a copy from pageable memory waits for every kernel queued before it on the
    stream, idling the thread that launches the next ones."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {
        k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
        if isinstance(v, torch.Tensor)
        else v
        for k, v in batch.items()
    }


def run_basic(state: State, modifiers: Sequence[Modifier]) -> None:
    """Run every calibration batch through the whole model on the execution device.

    The model goes back to the device it came from afterwards.
    """
    loader = state.require_data("The basic pipeline")
    home = next(state.model.parameters()).device
    model = state.model.to(state.device)
    qac = state.pipeline_args.quantization_aware_calibration
    with lifecycle(state, modifiers) as hook, torch.no_grad():
        hook.llmc_calibration_start(state=state)
        with contextlib.nullcontext() if qac else quantization_disabled(model):
            for index, batch in enumerate(tqdm(loader, desc="Calibrating", unit="batch")):
                batch, state.loss_mask = pop_loss_mask(batch)
                state.batch_index = index
                model(**to_device(batch, state.device), use_cache=False)
                hook.llmc_batch_end(state=state, batch_index=index)
        state.loss_mask = None
        hook.llmc_calibration_end(state=state)
    model.to(home)
