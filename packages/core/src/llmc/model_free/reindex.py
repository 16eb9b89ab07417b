"""``reindex_fused_weights``: put every fused group (q/k/v, gate/up, w1/w3) into one shard."""

from __future__ import annotations

import os

from llmc.model_free.run import Summary, process_checkpoint


def reindex_fused_weights(
    model_stub: str | os.PathLike, save_directory: str | os.PathLike, num_workers: int = 5
) -> Summary:
    """Rewrite a checkpoint so the weights that share an NVFP4 global scale share a shard.

    ``model_free_ptq`` already gathers split groups itself; this writes a
    checkpoint on which any per-shard tool (including older ones) can do the same.
    Tensors are copied unchanged; only their shard assignment and the index change.
    """
    return process_checkpoint(model_stub, save_directory, None, max_workers=num_workers, group_fused=True)
