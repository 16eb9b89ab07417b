"""Seconds per decoder layer for GPTQ W4A16 (or AWQ W4A16_ASYM, or SparseGPT 2:4) on Llama-3-8B-shaped layers, end to end.

End to end means what oneshot does for each layer: calibration forward passes, Hessian
accumulation, the GPTQ solves, and the propagation pass that feeds the next layer.
Random weights (speed does not depend on them). With --peer, the same model and data run
through llm-compressor in a separate process (its own site directory, given by
--peer-path) so both columns come from the same machine.

    python -m benchmarks.gptq_layer --samples 512 --seq 2048            # GPU machine
    python -m benchmarks.gptq_layer --modifier awq --layers 2 --samples 256 --seq 512
    python -m benchmarks.gptq_layer --modifier sparsegpt --layers 2 --samples 256 --seq 2048
    python -m benchmarks.gptq_layer --hidden 256 --intermediate 512 --samples 8 --seq 128  # CPU smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import LayerTimer, peak_memory, run_peer_script, table, write_json


def build(path: Path, args: argparse.Namespace) -> None:
    from llmc import tiny

    config = tiny.build_config(
        "llama",
        vocab_size=2048,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        torch_dtype="bfloat16",
    )
    # initialised on the GPU where there is one: an 8B model's random init takes minutes on CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tiny.build_model(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tiny.build_tokenizer(2048).save_pretrained(path)


def dataset(args: argparse.Namespace):
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 2048, (args.samples, args.seq), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def recipe(name: str):
    """The benchmarked modifier: GPTQ W4A16, AWQ W4A16_ASYM or SparseGPT 2:4, Linear layers but
    lm_head."""
    import llmc.modifiers as modifiers  # each name resolved only when asked: older trees lack some

    if name == "gptq":
        return modifiers.GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    if name == "sparsegpt":
        return modifiers.SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets="Linear", ignore=["re:.*lm_head"])
    return modifiers.AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])


def run_llmc(path: Path, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from llmc import oneshot
    from llmc.plugins import get_plugin_manager
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    data = dataset(args)
    timer = LayerTimer()
    modifier = recipe(args.modifier)
    get_plugin_manager().register(timer, name="benchmark-timer")
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    started = time.perf_counter()
    oneshot(
        model=model,
        recipe=modifier,
        dataset=data,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq,
        sequential_offload_device=args.offload,
    )
    total = time.perf_counter() - started
    get_plugin_manager().unregister(timer)
    return {
        "tool": f"llmc {args.modifier} (offload={args.offload})",
        "seconds_total": total,
        "seconds_per_layer": total / args.layers,
        "steady_seconds_per_layer": timer.steady_seconds_per_layer(),
        "solve_seconds_per_layer": getattr(modifier, "solve_seconds", 0.0) / args.layers or None,
        **peak_memory(),
    }


PEER = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier
import datasets
args = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
ids = torch.randint(4, 2048, (args["samples"], args["seq"]), generator=g)
data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(args["path"], dtype=torch.bfloat16)
cuda = torch.cuda.is_available()
torch.cuda.reset_peak_memory_stats() if cuda else None
started = time.perf_counter()
recipe = {
    "gptq": lambda: GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
    "awq": lambda: AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]),
    "sparsegpt": lambda: SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets="Linear", ignore=["re:.*lm_head"]),
}[args["modifier"]]()
oneshot(model=model, dataset=data, recipe=recipe,
        num_calibration_samples=args["samples"], max_seq_length=args["seq"])
total = time.perf_counter() - started
print("PEER_RESULT", json.dumps({"seconds_total": total, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))
"""


def run_peer(path: Path, args: argparse.Namespace) -> dict | None:
    if not args.peer_path:
        return None
    result = run_peer_script(PEER, {"path": str(path), "samples": args.samples, "seq": args.seq, "modifier": args.modifier}, args.peer_path)
    if "error" in result:
        return {"tool": "llm-compressor", **result}
    return {"tool": "llm-compressor", **result, "seconds_per_layer": result["seconds_total"] / args.layers}


def shape_arguments(parser: argparse.ArgumentParser, layers: int) -> None:
    """The Llama-3-8B shape and 512 × 2048 calibration tokens, each overridable."""
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq", type=int, default=2048)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, layers=3)
    parser.add_argument("--modifier", choices=["gptq", "awq", "sparsegpt"], default="gptq")
    parser.add_argument("--offload", default="cpu", help="sequential_offload_device for llmc")
    parser.add_argument("--peer-path", default=None, help="site directory holding llmcompressor")
    parser.add_argument("--skip-llmc", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build(path, args)
        rows = []
        peer = run_peer(path, args)
        if not args.skip_llmc:
            rows.append(run_llmc(path, args))
        if peer:
            rows.append(peer)
    if len(rows) == 2 and "seconds_total" in rows[1]:
        rows[0]["speedup_vs_peer"] = rows[1]["seconds_total"] / rows[0]["seconds_total"]
    columns = ["tool", "seconds_per_layer", "steady_seconds_per_layer", "solve_seconds_per_layer", "seconds_total", "peak_gpu_gib", "peak_rss_gib", "speedup_vs_peer"]
    print(table(rows, columns))
    out = write_json("gptq_layer", {"args": vars(args), "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
