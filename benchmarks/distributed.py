"""GPTQ W4A16 data-parallel over 1, 2, 4, 8 ranks (torchrun): seconds and scaling efficiency.

Builds the model once (default Llama-3-8B-shaped, 32 layers, random bf16, as
``benchmarks.gptq_model``) with 512 × 2048 random calibration tokens, then for each rank
count launches ``torchrun --standalone --nproc-per-node N`` on this module's worker: every
rank runs ``oneshot`` on its share of the batches (NCCL on GPUs, gloo on CPU); rank 0 times
the call (calibration and save) and writes its row. Efficiency is t(1) / (N × t(N)). Rank
counts beyond the machine's GPUs are skipped.

    python -m benchmarks.distributed --workdir /tmp                    # GPU machine: 1, 2, 4, 8 ranks
    python -m benchmarks.distributed --ranks 1,2 --hidden 256 --intermediate 512 --heads 4 \\
        --kv-heads 2 --layers 2 --samples 8 --seq 128                   # CPU smoke (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import peak_memory, table, write_json
from benchmarks.gptq_layer import build, dataset, shape_arguments


def worker(args: argparse.Namespace) -> None:
    """One rank: oneshot on the saved model; rank 0 writes the timing row to ``args.worker``."""
    from transformers import AutoModelForCausalLM

    from benchmarks.gptq_model import PhaseTimer
    from llmc import distributed, oneshot
    from llmc.plugins import get_plugin_manager
    from llmc_gptq.modifier import GPTQModifier

    distributed.initialize()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    timer = PhaseTimer()
    get_plugin_manager().register(timer, name="benchmark-phases")
    distributed.barrier()  # every rank loaded: time the oneshot call alone
    started = time.perf_counter()
    oneshot(model=model, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            dataset=dataset(args), num_calibration_samples=args.samples, max_seq_length=args.seq,
            output_dir=args.output, sequential_offload_device=args.offload)
    ended = time.perf_counter()
    if distributed.is_main():
        assert timer.calibration_end is not None
        Path(args.worker).write_text(json.dumps({
            "ranks": distributed.world_size(),
            "oneshot_seconds": ended - started,
            "calibration_seconds": timer.calibration_end - timer.start,
            "save_seconds": ended - timer.calibration_end,
            "steady_seconds_per_layer": timer.steady_seconds_per_layer(),
            **peak_memory(),
        }))


def launch(ranks: int, model: Path, work: Path, args: argparse.Namespace) -> dict:
    row_file, output = work / f"row-{ranks}.json", work / f"out-{ranks}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "benchmarks.distributed", "--worker", str(row_file), "--model", str(model),
               "--output", str(output), "--offload", args.offload,
               *(f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                 ("hidden", "intermediate", "heads", "kv-heads", "layers", "samples", "seq"))]
    started = time.perf_counter()
    # the CPU's cores shared by the ranks (torchrun would give each one thread: the save's
    # compression, on CPU, then takes several times longer)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads})
    wall = time.perf_counter() - started
    if done.returncode != 0 or not row_file.exists():
        return {"ranks": ranks, "error": f"exit status {done.returncode}"}
    return {**json.loads(row_file.read_text()), "launch_wall_seconds": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, layers=32)
    parser.add_argument("--ranks", default="1,2,4,8", help="rank counts to run, comma-separated")
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device")
    parser.add_argument("--workdir", default=None, help="where the model and outputs go (default: a temporary folder)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    gpus = torch.cuda.device_count()
    counts = [int(n) for n in args.ranks.split(",")]
    runnable = [n for n in counts if not gpus or n <= gpus]
    skipped = sorted(set(counts) - set(runnable))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = Path(tmp) / "model"
        build(model, args)
        for n in runnable:
            rows.append(launch(n, model, Path(tmp), args))
    base = next((r["oneshot_seconds"] for r in rows if r.get("ranks") == 1 and "oneshot_seconds" in r), None)
    for r in rows:
        if base is not None and "oneshot_seconds" in r:
            r["speedup"] = base / r["oneshot_seconds"]
            r["efficiency"] = r["speedup"] / r["ranks"]
    columns = ["ranks", "oneshot_seconds", "calibration_seconds", "save_seconds", "steady_seconds_per_layer",
               "speedup", "efficiency", "peak_gpu_gib", "error"]
    print(table(rows, columns))
    if skipped:
        print(f"skipped (this machine has {gpus} GPU(s)): {', '.join(map(str, skipped))} ranks")
    print(f"wrote {write_json('distributed', {'args': vars(args), 'results': rows, 'skipped_ranks': skipped})}")


if __name__ == "__main__":
    main()
