"""The sequential pipeline of this tree against an older one, in one process, runs interleaved.

Lent GPU machines drift by tens of percent between runs, and more between processes:
changes worth a few percent show only when both versions run in the same process, one
right after the other, each paired with a plain forward of its own repeat. The older
version is a directory holding its ``llmc_pipelines`` package, e.g.

    git archive <rev> packages/pipelines/src | tar -x -C /tmp/old
    python -m benchmarks.sequential_ab --old /tmp/old/packages/pipelines/src
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from types import ModuleType

import torch

from benchmarks import sequential_throughput as throughput
from benchmarks.common import table, write_json

PACKAGE = "llmc_pipelines"


def _ours() -> dict[str, object]:
    return {name: m for name, m in sys.modules.items() if name.split(".")[0] == PACKAGE}


def load_old(source: str, module: str = "sequential") -> ModuleType:
    """``llmc_pipelines.<module>`` of the package under ``source``, imported beside this tree's.

    Its modules keep their own globals; this tree's modules are back in place after.
    """
    importlib.import_module(f"{PACKAGE}.{module}")  # this tree's, before the swap

    source = os.path.abspath(source)
    saved = _ours()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, source)
    try:
        old = importlib.import_module(f"{PACKAGE}.{module}")
        if not old.__file__.startswith(source):
            raise SystemExit(f"--old {source}: no {PACKAGE} package there")
        return old
    finally:
        sys.path.remove(source)
        for name in _ours():
            del sys.modules[name]
        sys.modules.update(saved)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="directory holding the older llmc_pipelines")
    throughput.model_and_data_arguments(parser)
    parser.add_argument("--repeats", type=int, default=13)
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device")
    args = parser.parse_args(argv)

    import llmc_pipelines.sequential as sequential

    variants = {"old": load_old(args.old).run_sequential, "new": sequential.run_sequential}
    new = variants["new"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = throughput.build(args)
    data = throughput.batches(args)

    def run(name: str) -> dict:
        started = time.thread_time()
        if name == "plain":
            result = throughput.plain_forward(model, data, device)
        else:
            sequential.run_sequential = variants[name]  # what the plugin registers next
            try:
                result = throughput.sequential(model, data, device, False, args.offload)
            finally:
                sequential.run_sequential = new
        result["main_thread_cpu_seconds"] = time.thread_time() - started
        return result

    for name in variants:  # warm-up: kernels, pinned memory, both versions' imports
        sequential.run_sequential = variants[name]
        throughput.sequential(model, data[:2], device, False, args.offload)
    sequential.run_sequential = new
    runs: dict[str, list[dict]] = {"plain": [], "old": [], "new": []}
    for repeat in range(args.repeats):  # old first in even repeats, new first in odd ones
        for name in ("plain", "old", "new") if repeat % 2 == 0 else ("plain", "new", "old"):
            runs[name].append(run(name))
        print(" ".join(f"{k} {v[-1]['seconds']:.3f}" for k, v in runs.items()), flush=True)

    def seconds(name: str) -> list[float]:
        return [r["seconds"] for r in runs[name]]

    rows = []
    for name in runs:
        row = {
            "version": name,
            "fastest_seconds": min(seconds(name)),
            "median_seconds": statistics.median(seconds(name)),
            "median_main_thread_cpu_seconds": statistics.median(
                r["main_thread_cpu_seconds"] for r in runs[name]
            ),
        }
        if name != "plain":
            paired = [s / p - 1 for s, p in zip(seconds(name), seconds("plain"), strict=True)]
            row["paired_overhead_median"] = statistics.median(paired)
            row["fastest_overhead"] = row["fastest_seconds"] / min(seconds("plain")) - 1
            row["peak_gpu_gib"] = max(r["peak_gpu_gib"] or 0 for r in runs[name]) or None
        rows.append(row)
    ratios = [n / o - 1 for n, o in zip(seconds("new"), seconds("old"), strict=True)]
    summary = {
        "new_vs_old_paired_median": statistics.median(ratios),
        "new_faster_in": sum(r < 0 for r in ratios),
        "repeats": args.repeats,
    }
    print(
        table(
            rows,
            [
                "version",
                "fastest_seconds",
                "median_seconds",
                "fastest_overhead",
                "paired_overhead_median",
                "median_main_thread_cpu_seconds",
                "peak_gpu_gib",
            ],
        )
    )
    print(
        f"new against old, paired by repeat: median {summary['new_vs_old_paired_median']:+.3f}, "
        f"new faster in {summary['new_faster_in']} of {args.repeats}"
    )
    record = {"args": vars(args), "results": rows, "summary": summary, "runs": runs}
    print(f"wrote {write_json('sequential_ab', record)}")


if __name__ == "__main__":
    main()
