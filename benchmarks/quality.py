"""Quantize a trained benchmark model with several recipes, each in its own process, and
score each saved checkpoint against the unquantized model: what ``benchmarks.awq`` and
``benchmarks.autoround`` share.

Every row gets the same trained model (``benchmarks.models``) and the same calibration
token ids (the corpus' calibration split, chunked); each runs ``oneshot`` in a child
process (llmc's, or llm-compressor's through ``--peer-path``/``--peer-python``), saves
its checkpoint, which is decompressed and scored on the held-out split against the
unquantized model (both bfloat16): perplexity, KL divergence, top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch

from benchmarks.common import table, write_json

CHILD = r"""
import importlib, json, sys, time, torch, datasets
from transformers import AutoModelForCausalLM
args = json.loads(sys.argv[1])
data = torch.load(args["data"])
calib = datasets.Dataset.from_dict({"input_ids": data["calib"].tolist(),
                                    "attention_mask": torch.ones_like(data["calib"]).tolist()})
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(args["path"], dtype=torch.bfloat16 if device == "cuda" else torch.float32)
if args["peer"]:
    from llmcompressor import oneshot
    module = importlib.import_module("llmcompressor.modifiers." + args["peer_module"])
else:
    from llmc import oneshot
    module = importlib.import_module("llmc.modifiers")
recipe = getattr(module, args["modifier"])(**args["kwargs"])
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
model = oneshot(model=model, dataset=calib, recipe=recipe, num_calibration_samples=len(calib),
                max_seq_length=data["calib"].shape[1], batch_size=args["batch_size"])
seconds = time.perf_counter() - started
model.save_pretrained(args["out"], save_compressed=True)  # scored from the checkpoint, as served
print("CHILD_RESULT", json.dumps({"seconds": seconds,
      "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}))
"""

# llm-compressor's module for each modifier (llmc resolves every name in llmc.modifiers)
PEER_MODULES = {"AWQModifier": "awq", "GPTQModifier": "gptq", "QuantizationModifier": "quantization",
                "AutoRoundModifier": "autoround"}


@attrs.frozen
class Row:
    tool: str  # the label in the table
    modifier: str
    kwargs: dict[str, Any]
    peer: bool = False  # run by llm-compressor


def run(row: Row, path: Path, data: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    python = sys.executable
    if row.peer:
        if args.peer_path:
            env["PYTHONPATH"] = os.pathsep.join([args.peer_path, env.get("PYTHONPATH", "")])
        python = args.peer_python or python
    out = data.parent / row.tool
    payload = json.dumps({"peer": row.peer, "peer_module": PEER_MODULES.get(row.modifier), "modifier": row.modifier,
                          "kwargs": row.kwargs, "path": str(path), "data": str(data), "out": str(out),
                          "batch_size": args.batch_size})
    proc = subprocess.run([python, "-c", CHILD, payload], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD_RESULT")), None)
    if line is None:
        print(proc.stderr[-4000:], file=sys.stderr)
        return {"tool": row.tool, "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "failed"}
    return {"tool": row.tool, **json.loads(line.split(" ", 1)[1]), **score(path, out, torch.load(data)["eval"])}


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


def parser(description: str, samples: int, seq: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--batch-size", type=int, default=1, help="oneshot's calibration batch size")
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--peer-path", default=None, help="site directory holding llmcompressor")
    parser.add_argument("--peer-python", default=None, help="an interpreter with llmcompressor (e.g. a side venv)")
    parser.add_argument("--tools", default=None, help="comma-separated rows to run (default: all)")
    return parser


def compare_rows(name: str, rows: list[Row], args: argparse.Namespace, speedup: tuple[str, str] | None) -> None:
    """Run ``rows`` (peer rows only with a peer interpreter), print the table, write the JSON.
    ``speedup``: (llmc row, peer row) whose time ratio is reported."""
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
    with_peer = bool(args.peer_path or args.peer_python)
    rows = [r for r in rows if (with_peer or not r.peer) and (not args.tools or r.tool in args.tools.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.pt"
        torch.save({"calib": calib, "eval": held_out}, data)
        results = [run(row, path, data, args) for row in rows]
    for result in results:
        if "seconds" in result:
            result["seconds_per_layer"] = result["seconds"] / layers
    by_tool = {r["tool"]: r for r in results}
    if speedup and all("seconds" in by_tool.get(t, {}) for t in speedup):
        ours, peer = (by_tool[t] for t in speedup)
        ours["speedup_vs_peer"] = peer["seconds"] / ours["seconds"]
    print(f"{args.model}: {layers} layers, {samples} x {args.seq} calibration tokens")
    columns = ["tool", "seconds", "seconds_per_layer", "perplexity", "kl_divergence", "top1_agreement",
               "peak_gpu_gib", "speedup_vs_peer", "error"]
    print(table(results, columns))
    payload = {"model": args.model, "samples": samples, "seq": args.seq, "batch_size": args.batch_size,
               "recipes": [attrs.asdict(r) for r in rows], "rows": results}
    print(f"wrote {write_json(name, payload)}")
