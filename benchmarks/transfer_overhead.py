"""Launching-thread time the sequential pipeline's activation transfers cost per batch.

At one sequence per batch the sequential pipeline is bound by the thread that launches
the kernels, so every microsecond it spends per batch shows against the plain forward
(:mod:`benchmarks.sequential_throughput`). Whole-model runs on the lent machines scatter
by tens of percent; this loop times the transfers alone (a layer that launches nothing,
every pass storing its outputs, the device synchronised between passes and not timed),
to a microsecond per batch. ``--old`` times an older ``llmc_pipelines`` in the same
process, interleaved with this tree's.

    python -m benchmarks.transfer_overhead                                  # GPU machine
    python -m benchmarks.transfer_overhead --old /tmp/old/packages/pipelines/src
    python -m benchmarks.transfer_overhead --batches 16 --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import ModuleType

import torch

from benchmarks.common import table, write_json
from benchmarks.sequential_ab import load_old
from benchmarks.sequential_throughput import sync


class Cache:
    """One version's transfers and the hidden states it caches, captured as the pipeline does."""

    def __init__(self, transfers: ModuleType, args: argparse.Namespace, device: torch.device) -> None:
        self.transfers = transfers.Transfers(device, torch.device(args.offload))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = torch.Generator(device).manual_seed(0)
        self.hidden: list = []
        for _ in range(args.batches):
            batch = torch.randn(args.batch_size, args.seq, args.hidden, generator=g, device=device, dtype=dtype)
            self.transfers.append(self.hidden, batch)
        self.calls = [((), {})] * args.batches  # one call, as when every batch shares its arguments
        sync()

    def forward(self) -> float:
        """One pass over every batch; seconds the launching thread spent in it."""
        started = time.perf_counter()
        self.hidden = self.transfers.forward(self.hidden, self.calls, lambda b, h, call: h, store=True)
        launched = time.perf_counter() - started
        sync()
        return launched


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="directory holding an older llmc_pipelines to compare")
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--passes", type=int, default=24, help="forward passes per run (layers)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device")
    args = parser.parse_args(argv)

    import llmc_pipelines.transfers as transfers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    versions = {"new": transfers}
    if args.old:
        versions["old"] = load_old(args.old, "transfers")
    caches = {name: Cache(module, args, device) for name, module in versions.items()}
    for cache in caches.values():  # warm-up: allocator pools, pinned memory
        cache.forward()
    runs: dict[str, list[float]] = {name: [] for name in caches}
    for repeat in range(args.repeats):
        order = list(caches) if repeat % 2 == 0 else list(reversed(caches))
        for name in order:
            seconds = sum(caches[name].forward() for _ in range(args.passes))
            runs[name].append(seconds / (args.passes * args.batches) * 1e6)
    chunks = len(caches["new"].hidden)
    rows = [
        {
            "version": name,
            "chunks_per_pass": len(caches[name].hidden),
            "fastest_us_per_batch": min(us),
            "median_us_per_batch": statistics.median(us),
            "median_us_per_chunk": statistics.median(us) * args.batches / len(caches[name].hidden),
        }
        for name, us in runs.items()
    ]
    print(
        f"{args.batches} batches of {args.batch_size} x {args.seq} x {args.hidden} on {device}, "
        f"offload {args.offload}, {chunks} chunks per pass; launching-thread time per batch:"
    )
    print(table(rows, list(rows[0])))
    record = {"args": vars(args), "device": str(device), "results": rows, "runs_us_per_batch": runs}
    print(f"wrote {write_json('transfer_overhead', record)}")


if __name__ == "__main__":
    main()
