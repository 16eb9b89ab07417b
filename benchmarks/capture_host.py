"""Where the capture's launching thread spends each batch: GPTQ on Llama-3-8B-shaped layers.

The sequential pipeline's capture runs the model up to the first target on each batch and
calibrates the first target on it; at 512 × 2048 it is bound by the host thread that launches
the kernels (the device is busy about half the time, ``benchmarks.profile --window capture``).
This runs ``oneshot`` (GPTQ W4A16, random weights and tokens, as ``benchmarks.gptq_layer``) with
that thread's time measured around each piece of a capture step: the model's forward up to the
first target (``Capture.batch``, which includes comparing arguments with the last batch's and
storing them), the first target's calibration on the batch (its forward with the modifier's
hooks), and storing its outputs; the rest of the window is the data loader and the loop. With
``--syncs`` it lists instead the places that made the thread wait for the device (torch's sync
debug mode; the timing is then not representative).

    python -m benchmarks.capture_host                  # GPU machine: 2 layers, 512 × 2048
    python -m benchmarks.capture_host --samples 64 --syncs
    python -m benchmarks.capture_host --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --samples 16 --seq 128  # CPU smoke
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import peak_memory, table, write_json
from benchmarks.gptq_layer import build, dataset, recipe, shape_arguments

BATCH = "model forward to the first target (Capture.batch)"
ARGUMENTS = "  of which: arguments compared and stored"
CALIBRATION = "first target's calibration"
STORE = "storing the first target's outputs"


class CaptureClock:
    """Host seconds per piece of the capture, from its first batch to its end, and with
    ``syncs`` the Python stacks that waited for the device meanwhile."""

    def __init__(self, syncs: bool) -> None:
        self.syncs = syncs
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.stacks: collections.Counter[str] = collections.Counter()
        self.window = 0.0
        self._started: float | None = None

    def _timed(self, fn: Callable[..., Any], piece: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._started is None:
                return fn(*args, **kwargs)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[piece] += time.perf_counter() - started
                self.calls[piece] += 1

        return timed

    def _sync_mode(self, on: bool) -> None:
        if self.syncs and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn" if on else "default")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The pipeline's capture pieces wrapped for the block (restored after)."""
        from llmc_pipelines import sequential, transfers

        capture, clock = sequential.Capture, self
        patches = [
            (transfers.Transfers, "append", STORE),
            (transfers.Transfers, "offload_arguments", ARGUMENTS),
            (sequential, "run_layer", CALIBRATION),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        original_batch, original_exit = capture.batch, capture.__exit__

        def batch(self: Any, data: Any) -> Any:
            if clock._started is None:
                clock._started = time.perf_counter()
                clock._sync_mode(True)
            return timed_batch(self, data)

        def exit_(self: Any, *exc: Any) -> Any:
            if clock._started is not None:
                clock._sync_mode(False)
                clock.window = time.perf_counter() - clock._started
                clock._started = None
            return original_exit(self, *exc)

        timed_batch = self._timed(original_batch, BATCH)
        showwarning = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if clock._started is not None and "synchroniz" in str(message):
                frames = traceback.extract_stack()[:-2]
                where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:]]
                clock.stacks[" <- ".join(reversed(where))] += 1
            elif clock._started is None:
                showwarning(message, category, filename, lineno, file, line)

        try:
            for owner, name, piece in patches:
                setattr(owner, name, self._timed(getattr(owner, name), piece))
            capture.batch, capture.__exit__ = batch, exit_
            warnings.showwarning = show
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                yield
        finally:
            warnings.showwarning = showwarning
            capture.batch, capture.__exit__ = original_batch, original_exit
            for owner, name, fn in originals:
                setattr(owner, name, fn)

    def rows(self) -> list[dict[str, Any]]:
        batches = self.calls[BATCH]
        pieces = {k: self.seconds[k] for k in (BATCH, ARGUMENTS, CALIBRATION, STORE)}
        pieces["the rest (data loader, loop)"] = self.window - sum(self.seconds[k] for k in (BATCH, CALIBRATION, STORE))
        pieces["capture window"] = self.window
        return [
            {"piece": k, "seconds": v, "ms_per_batch": 1e3 * v / max(batches, 1), "calls": self.calls.get(k)}
            for k, v in pieces.items()
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, layers=2)
    parser.add_argument("--syncs", action="store_true", help="list where the thread waited for the device")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from llmc import oneshot

    clock = CaptureClock(args.syncs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build(path, args)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with clock.installed():
            oneshot(model=model, recipe=recipe("gptq"), dataset=dataset(args), num_calibration_samples=args.samples,
                    max_seq_length=args.seq)
    rows = clock.rows()
    print(table(rows, ["piece", "seconds", "ms_per_batch", "calls"]))
    waits = [{"waits": n, "where (innermost first)": k} for k, n in clock.stacks.most_common(20)]
    if args.syncs:
        print(table(waits, ["waits", "where (innermost first)"]) if waits else "no waits for the device recorded")
    result = {"args": vars(args), "pieces": rows, "waits": waits, **peak_memory()}
    print(f"wrote {write_json('capture_host', result)}")


if __name__ == "__main__":
    main()
