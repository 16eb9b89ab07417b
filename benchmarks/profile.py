"""Where a decoder layer's time goes: GPTQ or AWQ on Llama-3-8B-shaped layers, under torch.profiler.

Runs ``oneshot`` on a freshly built model (random weights, random tokens, as
``benchmarks.gptq_layer``) with the sequential pipeline's per-phase debug clock on, and
profiles from the end of the first layer's calibration to the end of the run (one
layer's solve and propagation, then every later layer whole): the first layer's
capture and warm-up stay out. Prints the operators with the most device time and
the most host time, the device's busy share of the wall time, and writes them as JSON.

    python -m benchmarks.profile --modifier gptq --layers 2 --samples 128 --seq 2048   # GPU machine
    python -m benchmarks.profile --modifier awq --layers 2 --samples 256 --seq 512
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


class ProfileFromFirstLayer:
    """Starts ``profiler`` when the first sequential layer ends (lifecycle plugin)."""

    def __init__(self, profiler: profile) -> None:
        self.profiler = profiler
        self.started: float | None = None

    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer) -> None:
        if self.started is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.start()
            self.started = time.perf_counter()


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, layers=2)
    parser.add_argument("--modifier", choices=["gptq", "awq"], default="gptq")
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from llmc import oneshot
    from llmc.plugins import get_plugin_manager

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("llmc_pipelines.sequential").setLevel(logging.DEBUG)  # the per-phase clock
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    starter = ProfileFromFirstLayer(profiler)
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
            wall = time.perf_counter() - (starter.started or time.perf_counter())
        finally:
            get_plugin_manager().unregister(starter)
            profiler.stop()
    events = profiler.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 1e6
    by_device, by_host = top(events, "self_device_time_total", args.top), top(events, "self_cpu_time_total", args.top)
    columns = ["op", "calls", "device_ms", "host_ms"]
    print(f"profiled {wall:.2f} s wall; device busy {device_total:.2f} s ({device_total / wall:.0%})")
    print("by device time\n" + table(by_device, columns))
    print("by host time\n" + table(by_host, columns))
    summary = {"modifier": args.modifier, "profiled_seconds": wall, "device_busy_seconds": device_total, **peak_memory()}
    print(f"wrote {write_json('profile', {'args': vars(args), 'summary': summary, 'by_device': by_device, 'by_host': by_host})}")


if __name__ == "__main__":
    main()
