"""Quality and cost of every recipe on a trained benchmark model, side by side.

    python -m benchmarks.run --model tiny --recipes fp,w8a16-rtn,w4a16-rtn,w4a16-gptq

For each recipe: compress with oneshot, reload the checkpoint through transformers,
then report held-out perplexity, KL divergence and top-1 agreement against the
unquantized model, checkpoint size, wall time, peak RSS and peak GPU memory. Each
recipe runs in its own process so peak memory is its own. Prints a table and writes
JSON. A recipe whose modifier is not installed is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import table, write_json

CALIBRATION = dict(dataset="llmc-docs", num_calibration_samples=128, max_seq_length=256)


def _quant(modifier: str, scheme: str, data: bool, **extra) -> dict:
    return {"recipe": {"bench_stage": {"quant_modifiers": {modifier: {"targets": ["Linear"], "scheme": scheme, "ignore": ["lm_head"], **extra}}}},
            "data": data}


RECIPES: dict[str, dict | None] = {
    "fp": None,
    "w8a16-rtn": _quant("QuantizationModifier", "W8A16", False),
    "w4a16-rtn": _quant("QuantizationModifier", "W4A16", False),
    "w4a16-asym-rtn": _quant("QuantizationModifier", "W4A16_ASYM", False),
    "fp8-dynamic": _quant("QuantizationModifier", "FP8_DYNAMIC", False),
    "nvfp4a16": _quant("QuantizationModifier", "NVFP4A16", False),
    "w4a16-gptq": _quant("GPTQModifier", "W4A16", True),
    "w4a16-asym-gptq": _quant("GPTQModifier", "W4A16_ASYM", True),
    "w4a16-awq": _quant("AWQModifier", "W4A16_ASYM", True),
    "w4a16-sym-awq": _quant("AWQModifier", "W4A16", True),
    "w4a16-awq-noclip": _quant("AWQModifier", "W4A16_ASYM", True, apply_clip=False),
    "w4a16-sym-awq-noclip": _quant("AWQModifier", "W4A16", True, apply_clip=False),
    "w4a16-awq-gptq": {  # llm-compressor 0.14's composition: AWQ scales, GPTQ quantizes
        "recipe": {"bench_stage": {"quant_modifiers": [
            {"AWQModifier": {}},
            {"GPTQModifier": {"targets": ["Linear"], "scheme": "W4A16_ASYM", "ignore": ["lm_head"]}},
        ]}},
        "data": True,
    },
    "w8a8-rtn": _quant("QuantizationModifier", "W8A8", False),
    "w8a8-gptq": _quant("GPTQModifier", "W8A8", True),
    "w8a8-smoothquant": {
        "recipe": {"bench_stage": {"quant_modifiers": [
            {"SmoothQuantModifier": {"smoothing_strength": 0.8}},
            {"QuantizationModifier": {"targets": ["Linear"], "scheme": "W8A8", "ignore": ["lm_head"]}},
        ]}},
        "data": True,
    },
    "w8a8-smoothquant-gptq": {
        "recipe": {"bench_stage": {"quant_modifiers": [
            {"SmoothQuantModifier": {"smoothing_strength": 0.8}},
            {"GPTQModifier": {"targets": ["Linear"], "scheme": "W8A8", "ignore": ["lm_head"]}},
        ]}},
        "data": True,
    },
}
DEFAULT = (
    "fp,w8a16-rtn,w4a16-rtn,fp8-dynamic,nvfp4a16,w4a16-gptq,w4a16-asym-rtn,w4a16-awq,w4a16-asym-gptq,"
    "w8a8-rtn,w8a8-smoothquant,w8a8-gptq,w8a8-smoothquant-gptq"
)

CHILD = r"""
import json, sys, time, resource, torch
from llmc import oneshot
spec = json.loads(sys.argv[1])
kwargs = dict(CAL, dataset=spec["dataset"]) if spec["data"] else {}
started = time.perf_counter()
oneshot(model=spec["model"], recipe=spec["recipe"], output_dir=spec["out"], **kwargs)
print("CHILD_RESULT", json.dumps({
    "seconds": time.perf_counter() - started,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
}))
""".replace("CAL", repr(CALIBRATION))


def compress(name: str, model: Path, out: Path, dataset: str) -> dict:
    spec = RECIPES[name]
    from llmc.plugins import get_registry

    registry = get_registry()
    needed = [m for stage in spec["recipe"].values() for group in stage.values()
              for m in (group if isinstance(group, dict) else {k: v for d in group for k, v in d.items()})]
    missing = [m for m in needed if not registry.has("modifier", m)]
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)}"}
    payload = json.dumps({"model": str(model), "recipe": spec["recipe"], "out": str(out), "data": spec["data"], "dataset": dataset})
    proc = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD_RESULT")), None)
    if line is None:
        return {"skipped": "failed: " + proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(line.split(" ", 1)[1])


def evaluate(reference_path: Path, checkpoint: Path, batches) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmc.evaluation import compare, load_decompressed, weights_size

    # bfloat16, as models are served (compressed-tensors decompresses FP4 formats to it)
    reference = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.bfloat16).eval()
    model = load_decompressed(checkpoint, dtype=torch.bfloat16)
    agreement = compare(reference, model, batches)
    return {
        "perplexity": agreement.perplexity,
        "kl_divergence": agreement.kl_divergence,
        "top1_agreement": agreement.top1_agreement,
        "size_mib": weights_size(checkpoint) / 2**20,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="benchmark model name (see benchmarks.models) or a checkpoint path")
    parser.add_argument("--recipes", default=DEFAULT)
    parser.add_argument("--eval-batches", type=int, default=40)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from benchmarks import models
    from llmc.data import corpus
    from llmc.evaluation import eval_batches

    path = Path(args.model) if Path(args.model).exists() else models.build(args.model)
    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    corpus_name = training.get("spec", {}).get("corpus", corpus.NAME)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = corpus.split_texts(corpus.EVALUATION, corpus_name)  # never seen by calibration or training
    batches = eval_batches(tokenizer, texts, seq_len=256, max_batches=args.eval_batches)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            if name not in RECIPES:
                raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
            row: dict = {"recipe": name}
            if RECIPES[name] is None:
                started = time.perf_counter()
                row.update(evaluate(path, path, batches), seconds=0.0)
                row["eval_seconds"] = time.perf_counter() - started
            else:
                out = Path(tmp) / name
                row.update(compress(name, path, out, corpus_name))
                if "skipped" not in row:
                    row.update(evaluate(path, out, batches))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows, ["recipe", "perplexity", "kl_divergence", "top1_agreement", "size_mib", "seconds", "peak_rss_gib", "peak_gpu_gib", "skipped"]))
    print(f"unigram perplexity (the bar a trained model must beat): {training.get('unigram_perplexity')}")
    print(f"wrote {write_json('run-' + Path(args.model).name, {'model': str(path), 'training': training, 'results': rows})}")


if __name__ == "__main__":
    main()
