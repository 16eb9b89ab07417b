"""AWQ W4A16_ASYM: seconds per layer and held-out quality, llmc against llm-compressor.

Every row gets the same trained benchmark model (``benchmarks.models``) and the same
calibration token ids (the corpus' calibration split, chunked); each runs in its own
process and saves its checkpoint, which is decompressed and scored on the held-out split
against the unquantized model (both bfloat16): perplexity, KL divergence, top-1 agreement. Rows: llmc's AWQ (with
its weight clipping), llmc's AWQ without it, round-to-nearest W4A16_ASYM (the bar AWQ must
clear), and llm-compressor's AWQ.

    python -m benchmarks.awq --model tiny --samples 64 --seq 256 --peer-python /tmp/lcvenv/bin/python  # CPU
    python -m benchmarks.awq --model small --peer-path /tmp/peer          # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import table, write_json

CHILD = r"""
import json, sys, time, torch, datasets
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
data = torch.load(args["data"])
calib = datasets.Dataset.from_dict({"input_ids": data["calib"].tolist(),
                                    "attention_mask": torch.ones_like(data["calib"]).tolist()})
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(args["path"], dtype=torch.bfloat16 if device == "cuda" else torch.float32)
if args["tool"].startswith("llmc"):
    from llmc import oneshot
    from llmc.modifiers import AWQModifier, QuantizationModifier
else:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
common = dict(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])
if args["tool"] == "llmc-rtn":
    recipe = QuantizationModifier(**common)
elif args["tool"] == "llmc-awq-noclip":
    recipe = AWQModifier(**common, n_grid=args["n_grid"], apply_clip=False)
else:
    recipe = AWQModifier(**common, n_grid=args["n_grid"])
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
model = oneshot(model=model, dataset=calib, recipe=recipe, num_calibration_samples=len(calib),
                max_seq_length=data["calib"].shape[1])
seconds = time.perf_counter() - started
model.save_pretrained(args["out"], save_compressed=True)  # scored from the checkpoint, as served
print("CHILD_RESULT", json.dumps({"seconds": seconds,
      "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}))
"""


def run(tool: str, path: Path, data: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    python = sys.executable
    if tool == "llm-compressor":
        if args.peer_path:
            env["PYTHONPATH"] = os.pathsep.join([args.peer_path, env.get("PYTHONPATH", "")])
        python = args.peer_python or python
    out = data.parent / tool
    payload = json.dumps({"tool": tool, "path": str(path), "data": str(data), "n_grid": args.n_grid, "out": str(out)})
    proc = subprocess.run([python, "-c", CHILD, payload], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD_RESULT")), None)
    if line is None:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"tool": tool, "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "failed"}
    return {"tool": tool, **json.loads(line.split(" ", 1)[1]), **score(path, out, torch.load(data)["eval"])}


def score(reference_path: Path, checkpoint: Path, batches: list[torch.Tensor]) -> dict:
    """Held-out agreement of the saved checkpoint (decompressed by compressed-tensors) with the
    unquantized model, both in bfloat16 as served."""
    from transformers import AutoModelForCausalLM

    from llmc.evaluation import compare, load_decompressed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.bfloat16).to(device).eval()
    model = load_decompressed(checkpoint, dtype=torch.bfloat16).to(device)
    agreement = compare(reference, model, batches)
    return {"perplexity": agreement.perplexity, "kl_divergence": agreement.kl_divergence,
            "top1_agreement": agreement.top1_agreement}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--n-grid", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--peer-path", default=None, help="site directory holding llmcompressor")
    parser.add_argument("--peer-python", default=None, help="an interpreter with llmcompressor (e.g. a side venv)")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    from benchmarks import models
    from llmc import tiny
    from llmc.data import corpus
    from llmc.evaluation import eval_batches

    path = models.build(args.model)
    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    corpus_name = training.get("spec", {}).get("corpus", corpus.NAME)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = tiny.corpus_token_ids(tokenizer, corpus.CALIBRATION, corpus_name)
    samples = min(args.samples, stream.numel() // args.seq)
    calib = stream[: samples * args.seq].reshape(samples, args.seq)
    held_out = eval_batches(tokenizer, corpus.split_texts(corpus.EVALUATION, corpus_name), 256, args.eval_batches)
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.pt"
        torch.save({"calib": calib, "eval": held_out}, data)
        peer = ["llm-compressor"] if args.peer_path or args.peer_python else []
        tools = ["llmc", "llmc-awq-noclip", "llmc-rtn", *peer]
        rows = [run(tool, path, data, args) for tool in tools]
    for row in rows:
        if "seconds" in row:
            row["seconds_per_layer"] = row["seconds"] / layers
    if peer and "seconds" in rows[-1] and "seconds" in rows[0]:
        rows[0]["speedup_vs_peer"] = rows[-1]["seconds"] / rows[0]["seconds"]
    print(f"{args.model}: {layers} layers, {samples} x {args.seq} calibration tokens")
    columns = ["tool", "seconds", "seconds_per_layer", "perplexity", "kl_divergence", "top1_agreement",
               "peak_gpu_gib", "speedup_vs_peer", "error"]
    print(table(rows, columns))
    print(f"wrote {write_json('awq', {'model': args.model, 'samples': samples, 'seq': args.seq, 'rows': rows})}")


if __name__ == "__main__":
    main()
