"""llm-compressor's sequential pipeline on the model and batches that
:mod:`benchmarks.sequential_throughput` saved: its ``--peer-path`` rows.

Runs in its own process with llmcompressor first on ``PYTHONPATH`` and imports
nothing of llmc. Like llmc's rows, a modifier that does nothing, so only the
pipeline's own cost is timed (whole ``oneshot`` calls), with and without
``propagate_error`` (llm-compressor's second pass per layer, llmc's
``quantization_aware_calibration``); a plain forward of the same batches in this
process gives its rows a baseline of their own. Prints one ``PEER_RESULT`` JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers import Modifier
    from transformers import AutoModelForCausalLM

    class Idle(Modifier):
        """Observes nothing."""

        def on_initialize(self, state, **kwargs) -> bool:
            return True

    args = json.loads(sys.argv[1])
    ids: torch.Tensor = torch.load(args["ids"])  # (batches * batch_size, seq)
    batch_size, repeats = args["batch_size"], args["repeats"]
    data = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(args["path"], dtype=getattr(torch, args["dtype"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def plain() -> float:
        with torch.no_grad():
            sync()
            started = time.perf_counter()
            for batch in ids.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
            sync()
        return time.perf_counter() - started

    def sequential(propagate_error: bool, samples: int) -> tuple[float, float | None]:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        started = time.perf_counter()
        oneshot(
            model=model,
            recipe=Idle(),
            dataset=data,
            pipeline="sequential",
            num_calibration_samples=samples,
            max_seq_length=ids.shape[1],
            batch_size=batch_size,
            shuffle_calibration_samples=False,
            propagate_error=propagate_error,
            sequential_offload_device="cpu",
        )
        sync()
        return time.perf_counter() - started, peak_gpu_gib()

    model.to(device)
    plain()  # warm-up
    plains = [plain() for _ in range(repeats)]
    model.to("cpu")
    sequential(True, batch_size)  # warm-up: imports, tracing machinery, kernels
    runs: dict[str, list[tuple[float, float | None]]] = {"False": [], "True": []}
    for _ in range(repeats):  # interleaved, as llmc's modes are
        for propagate_error in (False, True):
            runs[str(propagate_error)].append(sequential(propagate_error, len(ids)))
    print("PEER_RESULT", json.dumps({"plain_seconds": plains, "runs": runs}))


if __name__ == "__main__":
    main()
