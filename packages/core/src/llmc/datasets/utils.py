"""``get_rank_partition``, as llm-compressor's distributed example scripts call it."""

from __future__ import annotations

from llmc import distributed


def rank_bounds(num_samples: int, rank: int, ranks: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [start, end) of ``num_samples``: at least
    ``num_samples // ranks`` each, the remainder spread, every sample in exactly one share."""
    return num_samples * rank // ranks, num_samples * (rank + 1) // ranks


def get_rank_partition(split: str, num_samples: int) -> str:
    """This rank's slice of a datasets split string (``"train[0:128]"`` on rank 0 of 2 for 256
    samples), for ``load_dataset(..., split=...)``: each rank loads only its share, which
    ``oneshot`` then takes as that rank's calibration data. The whole ``num_samples`` outside
    a distributed run."""
    if "[" in split:
        raise ValueError(f"split {split!r} is sliced already; pass the plain split name (e.g. 'train').")
    start, end = rank_bounds(num_samples, distributed.rank(), distributed.world_size())
    return f"{split}[{start}:{end}]"
