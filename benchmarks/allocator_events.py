"""What a pending ``record_stream`` mark costs the thread that launches a decoder layer.

The caching allocator records an event when a block marked with ``record_stream`` is
freed, and until that event completes, every later allocation queries it. A decoder
layer allocates dozens of tensors per call, so the sequential pipeline (which, with
one sequence per batch, launches layers about as fast as the device runs them) marks
nothing inside a pass. This measures the launch time of one Llama decoder layer
(hidden 1024, the sequential_throughput model's) called 64 times, with no mark pending
and with marks pending on one to three side streams held busy.

    python -m benchmarks.allocator_events            # GPU machine; on a CPU it says so and stops
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import table, write_json


def build_layer(hidden: int, seq: int, device: torch.device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_hidden_layers=1,
    )
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).to(device, torch.bfloat16)
    states = torch.randn(1, seq, hidden, device=device, dtype=torch.bfloat16)
    positions = torch.arange(seq, device=device)[None]
    embeddings = LlamaRotaryEmbedding(config).to(device)(states, positions)
    return layer, states, positions, embeddings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("allocator_events measures the CUDA caching allocator: run it on the GPU machine")
        return
    device = torch.device("cuda")
    layer, states, positions, embeddings = build_layer(args.hidden, args.seq, device)
    side = [torch.cuda.Stream(device) for _ in range(3)]

    def run() -> None:
        with torch.no_grad():
            for _ in range(args.calls):
                layer(states, position_ids=positions, position_embeddings=embeddings)

    def pending(streams: int) -> None:
        for stream in side[:streams]:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(200_000_000)  # keeps the stream, and its mark, busy for a while
            block = torch.empty(1 << 20, device=device)
            block.record_stream(stream)
            del block  # freed: the allocator records an event on ``stream``

    run()
    torch.cuda.synchronize()
    # the device's own time: the calls are all queued behind a sleep, then run back to back
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(400_000_000)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    device_us = start.elapsed_time(end) * 1e3 / args.calls
    conditions = (0, 1, 2, 3)
    launches: dict[int, list[float]] = {streams: [] for streams in conditions}
    for _ in range(args.repeats):  # interleaved, so that drift in the machine's speed hits all
        for streams in conditions:
            torch.cuda.synchronize()
            pending(streams)
            started = time.perf_counter()
            run()
            launches[streams].append((time.perf_counter() - started) / args.calls * 1e6)
            torch.cuda.synchronize()
    rows = []
    for streams, times in launches.items():
        times.sort()
        rows.append(
            {
                "pending_streams": streams,
                "launch_us_fastest": times[0],
                "launch_us_median": times[len(times) // 2],
                "device_us": device_us,
            }
        )
    for row in rows:
        row["fastest_over_none"] = row["launch_us_fastest"] / rows[0]["launch_us_fastest"] - 1
        row["median_over_none"] = row["launch_us_median"] / rows[0]["launch_us_median"] - 1
    print(f"one decoder layer call: {device_us:.0f} us on the device")
    print(table(rows, list(rows[0])))
    print(f"wrote {write_json('allocator_events', {'args': vars(args), 'results': rows})}")


if __name__ == "__main__":
    main()
