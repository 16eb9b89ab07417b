"""The state shared by a stage's modifiers and the context that runs their lifecycle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import pluggy
import torch

from llmc.plugins import registered_modifiers

if TYPE_CHECKING:
    from llmc.args import PipelineArguments
    from llmc.modifiers.base import Modifier
    from llmc.resume import ResumeStore


@attrs.define
class State:
    """What a pipeline and its modifiers share while a stage runs."""

    model: torch.nn.Module
    pipeline_args: PipelineArguments
    device: torch.device
    dataloader: Iterable[dict[str, Any]] | None = None
    processor: Any = None
    stage: str | None = None
    # False while a pipeline re-runs a layer only to propagate its outputs: observers skip it.
    observing: bool = True
    # every modifier of the running stage, in recipe order (a transform such as AWQ without a
    # scheme takes its quantization arguments from the quantizing modifier after it)
    stage_modifiers: Sequence[Modifier] = ()
    # with use_loss_mask, the (batch, tokens) mask of the batch running now, set by the
    # pipeline before each batch's forward: 1 where a token counts in a modifier's objective
    loss_mask: torch.Tensor | None = None
    # the index, in this rank's share of the calibration set, of the batch running now (set by
    # the pipelines before each batch's forward; a distributed run orders observations by it)
    batch_index: int = 0
    # where the sequential pipeline keeps per-layer progress for a rerun to resume from
    # (beside output_dir; None: no output, or resume=False)
    progress: ResumeStore | None = None
    # a quantizing modifier whose targets select nothing only warns (oneshot's
    # allow_unmatched_targets); by default it is refused, as it would quantize nothing
    allow_unmatched_targets: bool = False

    def require_data(self, who: str) -> Iterable[dict[str, Any]]:
        if self.dataloader is None:
            raise ValueError(
                f"{who} needs calibration data, but no dataset was given. Pass dataset= "
                "(a registered name such as 'llmc-docs', a datasets.Dataset, or a DataLoader) "
                "or dataset_path= (a local JSON/JSONL/CSV file)."
            )
        return self.dataloader


# a batch's tokens that count in a modifier's objective (use_loss_mask): popped by the
# pipelines before the model's forward and handed to the modifiers as State.loss_mask
LOSS_MASK = "loss_mask"


def pop_loss_mask(batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A batch without its ``loss_mask`` (the model takes no such argument), and the mask."""
    if LOSS_MASK not in batch:
        return batch, None
    batch = dict(batch)
    return batch, batch.pop(LOSS_MASK)


@contextlib.contextmanager
def lifecycle(state: State, modifiers: Sequence[Modifier]) -> Iterator[pluggy.HookRelay]:
    """Initialize ``modifiers`` on entry, finalize them on a clean exit.

    Only these modifiers receive the lifecycle hooks fired inside the block.
    """
    with registered_modifiers(modifiers) as hook:
        hook.llmc_initialize(state=state)
        yield hook
        hook.llmc_finalize(state=state)
