"""A whole model through GPTQ W4A16, load → calibrate → save, with per-phase times.

The default is Llama-3-8B-shaped (32 layers, hidden 4096, intermediate 14336, GQA 32/8,
random bf16 weights saved to disk first) at 512 × 2048 random calibration tokens: the
setting of issue #30, whose goal is the ``oneshot`` call (calibration and save) under 100 s
on one H200 and the load before it at disk speed. Phases, from llmc's lifecycle events:

* ``load``: ``AutoModelForCausalLM.from_pretrained`` of the saved checkpoint (GB/s of it);
* ``setup``: oneshot's start to calibration start (dataset, recipe, quantization config);
* ``calibration``: the sequential pipeline over every layer (capture, calibration passes,
  Hessians, solves, propagation), with the steady seconds per layer and the solves' share;
* ``save``: calibration end to oneshot's return (finalize, compress, write the shards).

llm-compressor's rate on this shape comes from ``benchmarks.gptq_layer --peer-path`` (a
whole model through it takes about 15 minutes).

    python -m benchmarks.gptq_model                                       # GPU machine
    python -m benchmarks.gptq_model --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 \
        --layers 4 --samples 8 --seq 128                                  # CPU smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import LayerTimer, peak_memory, table, write_json
from benchmarks.gptq_layer import build, dataset, shape_arguments
from llmc.api import hookimpl


class PhaseTimer(LayerTimer):
    """Layer ends (:class:`LayerTimer`) and the calibration's start and end."""

    def __init__(self) -> None:
        super().__init__()
        self.calibration_end: float | None = None

    @hookimpl
    def llmc_calibration_end(self, state) -> None:
        self.sync()
        self.calibration_end = time.perf_counter()


def _size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9


def run(path: Path, out: Path, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from llmc import oneshot
    from llmc.plugins import get_plugin_manager
    from llmc_gptq.modifier import GPTQModifier

    data = dataset(args)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    load = time.perf_counter() - started
    timer = PhaseTimer()
    modifier = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    get_plugin_manager().register(timer, name="benchmark-phases")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        started = time.perf_counter()
        oneshot(model=model, recipe=modifier, dataset=data, num_calibration_samples=args.samples,
                max_seq_length=args.seq, output_dir=str(out), sequential_offload_device=args.offload)
        ended = time.perf_counter()
    finally:
        get_plugin_manager().unregister(timer)
    assert timer.calibration_end is not None
    size = _size_gb(path)
    return {
        "tool": "llmc",
        "checkpoint_gb": size,
        "load_seconds": load,
        "load_gb_per_s": size / load,
        "setup_seconds": timer.start - started,
        "calibration_seconds": timer.calibration_end - timer.start,
        "save_seconds": ended - timer.calibration_end,
        "oneshot_seconds": ended - started,
        "seconds_per_layer": (timer.calibration_end - timer.start) / args.layers,
        "steady_seconds_per_layer": timer.steady_seconds_per_layer(),
        "solve_seconds_per_layer": modifier.solve_seconds / args.layers,
        "saved_gb": _size_gb(out),
        **peak_memory(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, layers=32)
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device")
    parser.add_argument("--workdir", default=None, help="where the model and its output go (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path, out = Path(tmp) / "model", Path(tmp) / "out"
        started = time.perf_counter()
        build(path, args)
        built = time.perf_counter() - started
        row = run(path, out, args)
    row["build_seconds"] = built
    columns = ["tool", "checkpoint_gb", "load_seconds", "load_gb_per_s", "setup_seconds", "calibration_seconds",
               "save_seconds", "oneshot_seconds", "seconds_per_layer", "steady_seconds_per_layer",
               "solve_seconds_per_layer", "peak_gpu_gib", "peak_rss_gib"]
    print(table([row], columns))
    print(f"wrote {write_json('gptq_model', {'args': vars(args), 'results': [row]})}")


if __name__ == "__main__":
    main()
