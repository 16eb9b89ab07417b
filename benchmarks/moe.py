"""MoE oneshot on a Qwen3-MoE-30B-A3B-shaped model: seconds per layer, peak GPU, experts quantized.

Random bf16 weights (speed does not depend on them), random-token calibration,
``moe_calibrate_all_experts=True`` (every token through every expert). Recipes:
GPTQ W4A16 (sequential pipeline) and QuantizationModifier NVFP4 (static input
scales observed on the data). With --peer-path the same model, data and recipe
run through llm-compressor in a separate process (its own site directory), so
both rows come from one machine.

    python -m benchmarks.moe --peer-path /tmp/peer:/tmp/deps             # GPU machine
    python -m benchmarks.moe --hidden 256 --experts 8 --top-k 2 --moe-intermediate 128 \
        --heads 4 --kv-heads 2 --samples 8 --seq 64 --recipes gptq   # CPU smoke
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import LayerTimer, peak_memory, run_peer_script, table, write_json

IGNORE = ["lm_head", "re:.*mlp.gate$"]


def build(path: Path, args: argparse.Namespace) -> None:
    import transformers

    from llmc import tiny

    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads if args.head_dim is None else args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
        max_position_embeddings=4096, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():  # transformers leaves fused experts uninitialised
        if p.ndim == 3:
            p.data.normal_(0, 0.02)
    model.save_pretrained(path)
    tiny.build_tokenizer(2048).save_pretrained(path)


def token_ids(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(4, 2048, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))


def count_quantized_experts(folder: Path) -> tuple[int, int]:
    """(expert weights stored packed or as fp8/fp4, expert weights in all)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            names.update(handle.keys())
    experts = {n.rsplit(".", 1)[0] for n in names if ".experts." in n and n.rsplit(".", 1)[1] in ("weight", "weight_packed")}
    quantized = {m for m in experts if f"{m}.weight_packed" in names or f"{m}.weight_scale" in names}
    return len(quantized), len(experts)


def recipe(name: str, llmc: bool):
    if llmc:
        from llmc.modifiers import GPTQModifier, QuantizationModifier
    else:
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    if name == "gptq":
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)
    return QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=IGNORE)


def run_llmc(path: Path, out: Path, name: str, args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM

    from llmc import oneshot
    from llmc.plugins import get_plugin_manager

    ids = token_ids(args)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    timer = LayerTimer()
    get_plugin_manager().register(timer, name="benchmark-timer")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        oneshot(
            model=model, recipe=recipe(name, llmc=True), dataset=data, num_calibration_samples=args.samples,
            max_seq_length=args.seq, moe_calibrate_all_experts=True, pipeline="sequential", output_dir=str(out),
        )
    finally:
        get_plugin_manager().unregister(timer)
    total = time.perf_counter() - started
    quantized, experts = count_quantized_experts(out)
    return {
        "tool": "llmc", "recipe": name, "seconds_total": total, "seconds_per_layer": total / args.layers,
        "steady_seconds_per_layer": timer.steady_seconds_per_layer(),
        "experts_quantized": f"{quantized}/{experts}", **peak_memory(),
    }


# runs with llmcompressor on the path and nothing of llmc: the counting function travels as source
PEER = r"""
import json, sys, time, torch, datasets
from pathlib import Path
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
""" + inspect.getsource(count_quantized_experts) + r"""
args = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
ids = torch.randint(4, 2048, (args["samples"], args["seq"]), generator=g)
data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(args["path"], dtype=torch.bfloat16)
recipe = (GPTQModifier(targets="Linear", scheme="W4A16", ignore=args["ignore"]) if args["recipe"] == "gptq"
          else QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=args["ignore"]))
torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=args["samples"],
        max_seq_length=args["seq"], moe_calibrate_all_experts=True, output_dir=args["out"])
total = time.perf_counter() - started
quantized, experts = count_quantized_experts(Path(args["out"]))
print("PEER_RESULT", json.dumps({"seconds_total": total, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                                 "experts_quantized": f"{quantized}/{experts}"}))
"""


def run_peer(path: Path, out: Path, name: str, args: argparse.Namespace) -> dict | None:
    if not args.peer_path:
        return None
    payload = {"path": str(path), "out": str(out), "recipe": name, "samples": args.samples, "seq": args.seq, "ignore": IGNORE}
    result = run_peer_script(PEER, payload, args.peer_path)
    row = {"tool": "llm-compressor", "recipe": name, **result}
    if "seconds_total" in result:
        row["seconds_per_layer"] = result["seconds_total"] / args.layers
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--recipes", default="gptq,nvfp4", help="comma-separated: gptq, nvfp4")
    parser.add_argument("--peer-path", default=None, help="site directories holding llmcompressor")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build(path, args)
        for name in args.recipes.split(","):
            ours = run_llmc(path, Path(tmp) / f"llmc-{name}", name, args)
            peer = run_peer(path, Path(tmp) / f"peer-{name}", name, args)
            if peer and "seconds_total" in peer:
                ours["speedup_vs_peer"] = peer["seconds_total"] / ours["seconds_total"]
            rows += [ours] + ([peer] if peer else [])
            print(table(rows[-2:] if peer else rows[-1:], list(rows[-1])), flush=True)
    columns = ["tool", "recipe", "seconds_per_layer", "steady_seconds_per_layer", "seconds_total", "peak_gpu_gib",
               "experts_quantized", "speedup_vs_peer"]
    print(table(rows, columns))
    print(f"wrote {write_json('moe', {'args': vars(args), 'results': rows})}")


if __name__ == "__main__":
    main()
