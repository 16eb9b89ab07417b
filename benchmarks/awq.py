"""AWQ W4A16_ASYM: seconds per layer and held-out perplexity, llmc against llm-compressor.

Both tools get the same trained benchmark model (``benchmarks.models``) and the same
calibration token ids (the corpus' calibration split, chunked); each runs in its own
process, and the resulting in-memory models are scored on the held-out split.

    python -m benchmarks.awq --model tiny --samples 32 --seq 256          # CPU
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
if args["tool"] == "llmc":
    from llmc import oneshot
    from llmc.modifiers import AWQModifier
else:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
recipe = AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"], n_grid=args["n_grid"])
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
model = oneshot(model=model, dataset=calib, recipe=recipe, num_calibration_samples=len(calib),
                max_seq_length=data["calib"].shape[1])
seconds = time.perf_counter() - started
model = model.to(device).eval()
nll, count = 0.0, 0
with torch.no_grad():
    for batch in data["eval"]:
        ids = batch.to(device)
        logits = model(ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
print("CHILD_RESULT", json.dumps({"seconds": seconds, "perplexity": float(torch.tensor(nll / count).exp()),
      "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}))
"""


def run(tool: str, path: Path, data: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if tool == "llm-compressor":
        env["PYTHONPATH"] = os.pathsep.join([args.peer_path, env.get("PYTHONPATH", "")])
    payload = json.dumps({"tool": tool, "path": str(path), "data": str(data), "n_grid": args.n_grid})
    proc = subprocess.run([sys.executable, "-c", CHILD, payload], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD_RESULT")), None)
    if line is None:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"tool": tool, "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "failed"}
    return {"tool": tool, **json.loads(line.split(" ", 1)[1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--n-grid", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--peer-path", default=None, help="site directory holding llmcompressor")
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
        tools = ["llmc"] + (["llm-compressor"] if args.peer_path else [])
        rows = [run(tool, path, data, args) for tool in tools]
    for row in rows:
        if "seconds" in row:
            row["seconds_per_layer"] = row["seconds"] / layers
    if len(rows) == 2 and "seconds" in rows[1] and "seconds" in rows[0]:
        rows[0]["speedup_vs_peer"] = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"{args.model}: {layers} layers, {samples} x {args.seq} calibration tokens")
    print(table(rows, ["tool", "seconds", "seconds_per_layer", "perplexity", "peak_gpu_gib", "speedup_vs_peer", "error"]))
    print(f"wrote {write_json('awq', {'model': args.model, 'samples': samples, 'seq': args.seq, 'rows': rows})}")


if __name__ == "__main__":
    main()
