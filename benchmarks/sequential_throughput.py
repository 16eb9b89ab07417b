"""Calibration throughput of the sequential pipeline against a plain full-model forward.

A model of a few hundred million parameters is built from a config (random weights)
and the same batches go (a) through the whole model on the execution device, and
(b) through the sequential pipeline with a modifier that does nothing, so only the
pipeline's own cost is measured: capture, onloading one layer at a time,
activation offloading, and (with quantization-aware calibration) the second pass.

The default batches are oneshot's default calibration set (512 samples of 384
tokens, one per batch): what a user calibrates when they set nothing.

    python -m benchmarks.sequential_throughput                 # GPU machine
    python -m benchmarks.sequential_throughput --batches 64 --seq 2048   # [--batch-size 4]
    python -m benchmarks.sequential_throughput --hidden 256 --layers 4 --batches 4 --seq 128   # CPU smoke

``--peer-path`` adds llm-compressor's sequential pipeline on the same model and batches,
in its own process (:mod:`benchmarks.sequential_peer`).
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

import attrs
import torch

from benchmarks.common import peak_memory, table, write_json
from llmc.modifiers import Modifier


@attrs.define(kw_only=True)
class Idle(Modifier):
    """Observes nothing: what remains is the pipeline's own cost."""

    started: float = attrs.field(default=0.0, init=False)
    ended: float = attrs.field(default=0.0, init=False)

    def pipeline(self) -> str:
        return "sequential"

    def on_calibration_start(self, state) -> None:
        self.started = time.perf_counter()

    def on_calibration_end(self, state) -> None:
        sync()
        self.ended = time.perf_counter()


def build(args):
    from llmc import tiny

    config = tiny.build_config(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )
    return tiny.build_model(config).to(
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )


def batches(args):
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(4, args.vocab, (args.batch_size, args.seq), generator=g)}
        for _ in range(args.batches)
    ]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def layer_bytes(model) -> int:
    layer = model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def one_layer_peak_gib(model, args, device) -> float | None:
    """Peak memory of one decoder layer running one batch alone: the floor for any pipeline."""
    if device.type != "cuda":
        return None
    import copy

    torch.cuda.empty_cache()
    layer = copy.deepcopy(model.model.layers[0]).to(device)
    rotary = copy.deepcopy(model.model.rotary_emb).to(device)
    dtype = next(layer.parameters()).dtype
    hidden = torch.randn(args.batch_size, args.seq, args.hidden, device=device, dtype=dtype)
    positions = torch.arange(args.seq, device=device)[None]
    with torch.no_grad():
        embeddings = rotary(hidden, positions)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    del layer, rotary, hidden, embeddings
    torch.cuda.empty_cache()
    return peak


def copy_bandwidth(nbytes: int = 256 * 2**20) -> dict[str, float] | None:
    """Pinned host <-> device copy speed now (GB/s): the activations' road, and on lent
    machines it varies from one host to the next, so every result carries its own."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    speeds = {}
    for name, target, source in (("h2d_gbps", device, host), ("d2h_gbps", host, device)):
        target.copy_(source, non_blocking=True)
        sync()
        started = time.perf_counter()
        for _ in range(4):
            target.copy_(source, non_blocking=True)
        sync()
        speeds[name] = 4 * nbytes / (time.perf_counter() - started) / 1e9
    return speeds


def plain_forward(model, data, device) -> dict:
    model.to(device)
    with torch.no_grad():
        model(**{k: v.to(device) for k, v in data[0].items()}, use_cache=False)  # warm-up
        sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for batch in data:
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
        sync()
    seconds = time.perf_counter() - started
    model.to("cpu")
    return {"mode": "plain forward (whole model on device)", "seconds": seconds, **peak_memory()}


def sequential(model, data, device, qac: bool, offload: str, resident: bool = False) -> dict:
    """``resident``: the model's weights start (and stay) on the device, as when it fits there;
    otherwise they start on the CPU and each layer moves to the device for its turn."""
    from torch.utils.data import DataLoader

    from llmc import oneshot

    if resident:
        model.to(device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(data, batch_size=None)
    sync()
    started = time.perf_counter()
    idle = Idle()
    oneshot(
        model=model,
        recipe=idle,
        dataset=loader,
        pipeline="sequential",
        device=str(device),
        quantization_aware_calibration=qac,
        sequential_offload_device=offload,
    )
    sync()
    seconds = time.perf_counter() - started
    model.to("cpu")
    mode = f"sequential (qac={qac}, offload={offload}{', weights resident' if resident else ''})"
    pipeline = idle.ended - idle.started
    return {
        "mode": mode,
        "qac": qac,
        "seconds": seconds,
        "pipeline_seconds": pipeline,
        **peak_memory(),
    }


def peer(model, data, args) -> list[dict]:
    """llm-compressor's rows: its sequential pipeline on this model (saved) and these batches,
    in a process of its own with ``args.peer_path`` first on the path."""
    from llmc import tiny

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tiny.build_tokenizer().save_pretrained(tmp)  # its oneshot loads a processor; ids are given
        ids = Path(tmp) / "ids.pt"
        torch.save(torch.cat([batch["input_ids"] for batch in data]), ids)
        payload = {"path": tmp, "ids": str(ids), "dtype": dtype}
        payload |= {"batch_size": args.batch_size, "repeats": args.repeats}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([args.peer_path, env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.sequential_peer", json.dumps(payload)],
            env=env,
            capture_output=True,
            text=True,
        )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEER_RESULT")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        return [{"mode": "llm-compressor sequential", "error": proc.stderr[-500:]}]
    result = json.loads(line.split(" ", 1)[1])
    own_plain = min(result["plain_seconds"])
    rows = []
    for propagate_error, runs in result["runs"].items():
        seconds = sorted(seconds for seconds, _ in runs)
        rows.append(
            {
                "mode": f"llm-compressor sequential (propagate_error={propagate_error}, offload=cpu)",
                "qac": propagate_error == "True",
                "seconds": seconds[0],
                "median_seconds": seconds[len(seconds) // 2],
                "runs_seconds": [seconds for seconds, _ in runs],
                "own_plain_seconds": own_plain,
                "overhead_vs_own_plain": seconds[0] / own_plain - 1,
                "peak_gpu_gib": max((p for _, p in runs if p is not None), default=None),
                "peak_rss_gib": None,  # one process for both of its modes and the plain forward
            }
        )
    return rows


def model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's shape and the batches: what :func:`build` and :func:`batches` read."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_and_data_arguments(parser)
    parser.set_defaults(batches=512, seq=384)  # oneshot's num_calibration_samples, max_seq_length
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="runs of each mode, interleaved; the fastest is reported (others are interference)",
    )
    parser.add_argument(
        "--modes",
        default="",
        help="comma-separated, 'plain' first: plain,cpu,cpu-resident,cuda,cuda-resident,"
        "qac-cpu,qac-cuda (default: all the device allows)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where the sequential pipeline spends CPU time"
    )
    parser.add_argument(
        "--peer-path",
        default=None,
        help="site directory holding llmcompressor: adds its sequential pipeline's rows",
    )
    args = parser.parse_args(argv)
    missing = [p for p in (args.peer_path or "").split(os.pathsep) if p and not Path(p).is_dir()]
    if missing:  # found out only after every llmc run otherwise
        parser.error(f"--peer-path: no directory {', '.join(missing)} (pip install --target it)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # modes are checked before the model is built; they run on the model and data made below
    available = {"plain": lambda: plain_forward(model, data, device)}
    for qac in (False, True):
        for offload in ["cpu", "cuda"] if device.type == "cuda" else ["cpu"]:
            for resident in (False, True) if device.type == "cuda" and not qac else (False,):
                name = ("qac-" if qac else "") + offload + ("-resident" if resident else "")
                available[name] = lambda qac=qac, offload=offload, resident=resident: sequential(
                    model, data, device, qac, offload, resident
                )
    chosen = args.modes.split(",") if args.modes else list(available)
    unknown = sorted(set(chosen) - set(available))
    if unknown or chosen[0] != "plain":
        parser.error(f"--modes: first 'plain', then any of {', '.join(available)}; got {args.modes}")
    modes = [available[name] for name in chosen]
    model = build(args)
    params = sum(p.numel() for p in model.parameters())
    data = batches(args)
    tokens = args.batches * args.batch_size * args.seq
    sequential(model, data[:1], device, True, "cpu")  # warm-up: imports, plugin registry, kernels
    bandwidth_before = copy_bandwidth()
    # interleaved, so that drift in the machine's speed hits every mode alike
    runs = [[mode() for mode in modes] for _ in range(args.repeats)]
    rows = []
    for results in zip(*runs, strict=True):
        ordered = sorted(results, key=lambda r: r["seconds"])
        row = dict(ordered[0])  # as timeit does: slower runs measure other processes
        row["median_seconds"] = ordered[len(ordered) // 2]["seconds"]
        row["runs_seconds"] = [r["seconds"] for r in results]
        # each run against the plain forward of the same repeat, seconds apart: the machine's
        # speed drifts over minutes, so these ratios scatter less than the runs do
        ratios = sorted(r["seconds"] / run[0]["seconds"] for r, run in zip(results, runs, strict=True))
        row["paired_overhead"] = ratios[len(ratios) // 2] - 1
        rows.append(row)
    if args.peer_path:
        rows += peer(model, data, args)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        with profile(activities=activities) as prof:
            sequential(model, data, device, False, "cpu")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    bandwidth = {"before": bandwidth_before, "after": copy_bandwidth()}
    base = rows[0]["seconds"]
    one_layer_gib = layer_bytes(model) / 2**30
    floor = one_layer_peak_gib(model, args, device)
    for row in rows:
        if "seconds" not in row:  # the peer failed; its error is in the row
            continue
        row["tokens_per_second"] = tokens / row["seconds"]
        row["overhead_vs_plain"] = row["seconds"] / base - 1
        row["median_overhead_vs_plain"] = row["median_seconds"] / rows[0]["median_seconds"] - 1
        if "pipeline_seconds" in row:  # calibration alone, without oneshot's set-up and wrap-up
            row["pipeline_overhead_vs_plain"] = row["pipeline_seconds"] / base - 1
        if row.get("peak_gpu_gib") is not None and floor:
            row["gpu_peak_over_one_layer_run"] = row["peak_gpu_gib"] / floor
        if row["mode"].startswith("llm-compressor"):  # against llmc's mode with its passes
            ours = [r for r in rows if r["mode"] == f"sequential (qac={row['qac']}, offload=cpu)"]
            if ours:
                row["llmc_speedup"] = row["seconds"] / ours[0]["seconds"]
    print(
        f"model: {params / 1e6:.0f} M parameters, {args.layers} layers; {tokens} tokens; "
        f"one layer's weights {one_layer_gib:.3f} GiB; one layer running one batch peaks at {floor} GiB; "
        f"pinned copies (GB/s): {bandwidth}"
    )
    print(
        table(
            rows,
            [
                "mode",
                "seconds",
                "pipeline_seconds",
                "tokens_per_second",
                "overhead_vs_plain",
                "pipeline_overhead_vs_plain",
                "median_overhead_vs_plain",
                "paired_overhead",
                "overhead_vs_own_plain",
                "llmc_speedup",
                "peak_gpu_gib",
                "gpu_peak_over_one_layer_run",
                "peak_rss_gib",
            ],
        )
    )
    print(
        f"wrote {write_json('sequential_throughput', {'args': vars(args), 'parameters': params, 'one_layer_run_peak_gib': floor, 'copy_bandwidth': bandwidth, 'results': rows})}"
    )


if __name__ == "__main__":
    main()
