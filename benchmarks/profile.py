"""Where a decoder layer's time goes: GPTQ or AWQ on Llama-3-8B-shaped layers, under torch.profiler.

Runs ``oneshot`` on a freshly built model (random weights, random tokens, as
``benchmarks.gptq_layer``) with the sequential pipeline's per-phase debug clock on, and
profiles from the end of the first layer's calibration to the end of the run (one
layer's solve and propagation, then every later layer whole): the first layer's
capture and warm-up stay out. ``--window capture`` profiles only them instead: from the
calibration's start to the first layer's end (the capture, with the first layer
calibrated on each batch as it is captured, and its solve). Prints the operators with
the most device time and the most host time, the device's busy share of the wall time
and its longest idle gaps, and writes them as JSON.

    python -m benchmarks.profile --modifier gptq --layers 2 --samples 128 --seq 2048   # GPU machine
    python -m benchmarks.profile --modifier awq --layers 2 --samples 256 --seq 512
    python -m benchmarks.profile --modifier gptq --window capture --samples 256   # the capture and first layer
    python -m benchmarks.profile --modifier gptq --memory --samples 128   # allocations alive at the GPU peak
    python -m benchmarks.profile --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --samples 8 --seq 128  # CPU smoke
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import peak_memory, table, write_json
from benchmarks.gptq_layer import build, dataset, recipe, shape_arguments
from llmc.api import hookimpl


class ProfileWindow:
    """Profiles one window of the run (lifecycle plugin): ``after-first`` from the first
    sequential layer's end to the run's end, ``capture`` from the calibration's start to
    the first layer's end."""

    def __init__(self, profiler: profile, window: str) -> None:
        self.profiler, self.window = profiler, window
        self.started: float | None = None
        self.stopped: float | None = None

    def _start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.start()
        self.started = time.perf_counter()

    @hookimpl
    def llmc_calibration_start(self, state) -> None:
        if self.window == "capture":
            self._start()

    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer) -> None:
        if self.window == "after-first" and self.started is None:
            self._start()
        elif self.window == "capture" and self.stopped is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stopped = time.perf_counter()
            self.profiler.stop()


def top(events, key: str, count: int) -> list[dict]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]
    return [
        {
            "op": e.key[:70],
            "calls": e.count,
            "device_ms": e.self_device_time_total / 1e3,
            "host_ms": e.self_cpu_time_total / 1e3,
        }
        for e in rows
    ]


def device_gaps(events, count: int) -> tuple[float, list[float]]:
    """Seconds the device ran any kernel or copy (overlaps merged), and its longest idle gaps (ms)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    busy, gaps, end = 0.0, [], None
    for start, stop in spans:
        if end is None or start > end:
            if end is not None:
                gaps.append((start - end) / 1e3)
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e6, sorted(gaps, reverse=True)[:count]


def live_at_peak(snapshot: dict, top_count: int) -> tuple[int, list[dict]]:
    """Replays the allocator's trace: the peak of allocated bytes, and the blocks alive at
    it grouped by the innermost frame of this project's code that allocated them."""
    events = [e for e in snapshot["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    live, total, peak, peak_index = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif live.pop(e["addr"], None) is not None:
            total -= e["size"]
        if total > peak:
            peak, peak_index = total, i
    live = {}
    for e in events[: peak_index + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)
    groups: dict[str, int] = {}
    for e in live.values():
        ours = [f for f in e.get("frames", []) if "llmc" in f["filename"] or "benchmarks" in f["filename"]]
        frame = (ours or e.get("frames") or [{"filename": "?", "line": 0, "name": "?"}])[0]
        where = f"{frame['filename'].rsplit('/src/', 1)[-1]}:{frame['line']} {frame['name']}"
        groups[where] = groups.get(where, 0) + e["size"]
    rows = sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:top_count]
    return peak, [{"allocated_at": k[:90], "gib": v / 2**30} for k, v in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, layers=2)
    parser.add_argument("--modifier", choices=["gptq", "awq"], default="gptq")
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--window", choices=["after-first", "capture"], default="after-first",
                        help="after the first layer's calibration (default), or the capture and the first layer")
    parser.add_argument("--memory", action="store_true",
                        help="instead of timing: the CUDA allocations alive at the peak, by where they were made")
    args = parser.parse_args(argv)
    if args.memory:
        return memory(args)
    from transformers import AutoModelForCausalLM

    from llmc import oneshot
    from llmc.plugins import get_plugin_manager

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("llmc_pipelines.sequential").setLevel(logging.DEBUG)  # the per-phase clock
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    starter = ProfileWindow(profiler, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build(path, args)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        data = dataset(args)
        get_plugin_manager().register(starter, name="benchmark-profile")
        try:
            oneshot(model=model, recipe=recipe(args.modifier), dataset=data, num_calibration_samples=args.samples,
                    max_seq_length=args.seq, sequential_offload_device=args.offload)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ended = starter.stopped or time.perf_counter()
            wall = ended - (starter.started or ended)
        finally:
            get_plugin_manager().unregister(starter)
            if starter.stopped is None:
                profiler.stop()
    device_busy, gaps = device_gaps(profiler.events(), 8)
    events = profiler.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 1e6
    by_device, by_host = top(events, "self_device_time_total", args.top), top(events, "self_cpu_time_total", args.top)
    columns = ["op", "calls", "device_ms", "host_ms"]
    print(f"profiled {wall:.2f} s wall; device busy {device_total:.2f} s ({device_total / wall:.0%})")
    print("by device time\n" + table(by_device, columns))
    print("by host time\n" + table(by_host, columns))
    print(f"device busy (kernels and copies merged) {device_busy:.2f} s; longest idle gaps, ms: "
          + ", ".join(f"{g:.1f}" for g in gaps))
    summary = {"modifier": args.modifier, "window": args.window, "profiled_seconds": wall, "device_busy_seconds": device_total,
               "device_busy_merged_seconds": device_busy, "longest_idle_gaps_ms": gaps, **peak_memory()}
    result = {"args": vars(args), "summary": summary, "by_device": by_device, "by_host": by_host}
    print(f"wrote {write_json('profile', result)}")



def memory(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from llmc import oneshot

    if not torch.cuda.is_available():
        raise SystemExit("--memory reads the CUDA allocator's trace: run it on the GPU machine.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build(path, args)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        oneshot(model=model, recipe=recipe(args.modifier), dataset=dataset(args), num_calibration_samples=args.samples,
                max_seq_length=args.seq, sequential_offload_device=args.offload)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, rows = live_at_peak(snapshot, args.top)
    print(f"peak {peak / 2**30:.2f} GiB allocated; alive at the peak:\n" + table(rows, ["allocated_at", "gib"]))
    out = write_json("profile-memory", {"args": vars(args), "peak_gib": peak / 2**30, "live_at_peak": rows, **peak_memory()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
