"""What the sequential pipeline's pinned activation memory costs, with and without huge pages.

The capture of an 8B model's 512 × 2048 hidden states stores 8.6 GB into page-locked slabs
(``llmc_pipelines.pinned``), prepared on a thread. Two questions: how
fast slabs are faulted in, registered with CUDA, filled from the device and let go, with
the kernel asked for transparent huge pages (``madvise(MADV_HUGEPAGE)``) or not; and
whether a thread registering slabs slows the launching thread (the driver may hold a lock
meanwhile). With ``--capture`` (CUDA): the capture itself at Llama-3-8B shapes (two layers,
random weights), with the activations kept on the GPU, stored in slabs registered while it
runs (on huge pages, on 4 KiB pages, unfilled), and stored in slabs registered before it
starts, as the pipeline now does: how much of it is pinning.

    python -m benchmarks.pinned_memory --capture        # GPU machine
    python -m benchmarks.pinned_memory --slabs 4        # CPU: fault-in rates only
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import threading
import time

import torch

from benchmarks.common import table, write_json
from llmc_pipelines import pinned

MIB = 2**20


def thp_mode() -> str | None:
    """The kernel's transparent huge page policy (the bracketed word), None off Linux."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def slab(size: int, huge: bool) -> tuple[torch.Tensor, float]:
    """A faulted-in CPU slab of ``size`` bytes (huge pages asked for, or not) and the fault-in seconds."""
    raw = torch.empty(size, dtype=torch.uint8)
    if huge:
        pinned._advise_huge_pages(raw)
    started = time.perf_counter()
    raw.zero_()
    return raw, time.perf_counter() - started


def rates(huge: bool, slabs: int, size: int) -> dict:
    """GB/s of fault-in, and on CUDA of registration, device-to-host copies and unregistration."""
    row: dict = {"huge_pages": huge}
    kept, fault = [], 0.0
    for _ in range(slabs):
        raw, seconds = slab(size, huge)
        kept.append(raw)
        fault += seconds
    gb = slabs * size / 1e9
    row["fault_in_gb_s"] = gb / fault
    if not torch.cuda.is_available():
        return row
    cudart = torch.cuda.cudart()
    started = time.perf_counter()
    for raw in kept:
        cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0)
    row["register_gb_s"] = gb / (time.perf_counter() - started)
    source = torch.randn(8 * MIB, device="cuda", dtype=torch.bfloat16)  # 16 MiB, a 2048-token batch at 4096
    torch.cuda.synchronize()
    started = time.perf_counter()
    for raw in kept:
        for offset in range(0, size - 16 * MIB + 1, 16 * MIB):
            raw[offset : offset + 16 * MIB].view(torch.bfloat16).copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    row["d2h_gb_s"] = gb / (time.perf_counter() - started)
    started = time.perf_counter()
    for raw in kept:
        cudart.cudaHostUnregister(raw.data_ptr())
    row["unregister_gb_s"] = gb / (time.perf_counter() - started)
    return row


def launch_us(count: int = 5000) -> float:
    """Microseconds the launching thread spends per small kernel."""
    x = torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    seconds = time.perf_counter() - started
    torch.cuda.synchronize()
    return seconds / count * 1e6


def launch_while_registering(huge: bool, size: int) -> float:
    """:func:`launch_us` while another thread faults in and registers slabs."""
    stop, made = threading.Event(), []

    def register() -> None:
        while not stop.is_set():
            raw, _ = slab(size, huge)
            torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), raw.numel(), 0)
            made.append(raw)

    thread = threading.Thread(target=register)
    thread.start()
    time.sleep(0.05)
    try:
        return launch_us()
    finally:
        stop.set()
        thread.join()
        for raw in made:
            torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())


def capture_rows(samples: int, seq: int) -> list[dict]:
    """Seconds to capture the first layer's inputs of ``samples`` × ``seq`` tokens, five ways."""
    from llmc import tiny
    from llmc_pipelines.sequential import Capture, sequential_targets
    from llmc_pipelines.transfers import Transfers

    config = tiny.build_config("llama", vocab_size=2048, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8)
    with torch.device("cuda"):
        model = tiny.build_model(config).to(torch.bfloat16).eval()
    layers = sequential_targets(model, ["LlamaDecoderLayer"])
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 2048, (1, seq), generator=g)} for _ in range(samples)]
    device = torch.device("cuda")
    slabs_needed = -(-samples * seq * 4096 * 2 // pinned.SLAB_BYTES) + 1

    register = pinned._register

    def run(offload: str, registered_first: bool = False, **slab: bool) -> float:
        transfers = Transfers(device, torch.device(offload))
        ahead: contextlib.AbstractContextManager = transfers.capturing()
        if registered_first and transfers.slabs is not None:
            ready = [register(pinned.SLAB_BYTES) for _ in range(slabs_needed)]
            transfers.slabs._prepared = lambda: ready.pop() if ready else register(pinned.SLAB_BYTES)
            ahead = contextlib.nullcontext()
        pinned._register = functools.partial(register, **slab)
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            with torch.no_grad(), Capture(model, layers, device, transfers) as capture, ahead:
                for batch in batches:
                    capture.batch(batch)
            transfers.close()
            torch.cuda.synchronize()
        finally:
            pinned._register = register
        return time.perf_counter() - started

    run("cuda")  # first calls: kernels, rotary tables
    rows = []
    for name, offload, first, slab in (
        ("kept on the GPU", "cuda", False, {}),
        ("pinned slabs registered during it", "cpu", False, {}),
        ("pinned slabs, 4 KiB pages", "cpu", False, {"huge": False}),
        ("pinned slabs, not filled first", "cpu", False, {"fill": False}),
        ("slabs registered before", "cpu", True, {}),
    ):
        rows.append({"capture": name, "samples": samples, "seq": seq, "seconds": run(offload, first, **slab)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slabs", type=int, default=8, help="slabs per measurement")
    parser.add_argument("--slab-mib", type=int, default=256)
    parser.add_argument("--capture", action="store_true", help="also time the capture at 8B shapes (CUDA)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    size = args.slab_mib * MIB
    rates(False, 1, size)  # untimed: the fill's threads start, the first mappings
    rows = [rates(huge, args.slabs, size) for huge in (False, True, False, True)]
    if torch.cuda.is_available():
        rows[0]["launch_us"] = launch_us()
        for row in rows[:2]:
            row["launch_us_while_registering"] = launch_while_registering(row["huge_pages"], size)
    print(f"transparent huge pages: {thp_mode()}")
    columns = ["huge_pages", "fault_in_gb_s", "register_gb_s", "d2h_gb_s", "unregister_gb_s", "launch_us",
               "launch_us_while_registering"]
    print(table(rows, columns))
    captures = capture_rows(args.samples, args.seq) if args.capture and torch.cuda.is_available() else []
    if captures:
        print(table(captures, ["capture", "samples", "seq", "seconds"]))
    print(f"wrote {write_json('pinned_memory', {'thp': thp_mode(), 'rows': rows, 'captures': captures})}")


if __name__ == "__main__":
    main()
