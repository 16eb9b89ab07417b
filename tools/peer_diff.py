"""The same recipe through llmc and llm-compressor, checkpoint against checkpoint.

For each (model, recipe) it builds a tiny local model (Llama, Qwen3, Qwen3-MoE, Mixtral),
runs ``oneshot`` on the same calibration tokens with llmc here and with llm-compressor in
another interpreter (a side venv), and compares what each saved: tensor names, dtypes and
shapes, how many values are equal (and how far apart the floats are), and the
``quantization_config``. Where they differ, the table says by how much; why is for a person
to read (docs/compatibility.md keeps the findings).

    python -m venv /tmp/lcv && /tmp/lcv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    python tools/peer_diff.py --peer-python /tmp/lcv/bin/python                 # every case
    python tools/peer_diff.py --peer-python /tmp/lcv/bin/python --only moe      # names containing "moe"
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("llmc.peer_diff")

MOE_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"]


def _modifier(name: str, scheme: str, ignore: list[str], **extra: Any) -> dict:
    return {name: {"targets": ["Linear"], "scheme": scheme, "ignore": ignore, **extra}}


def _recipe(*modifiers: dict) -> dict:
    return {"quant_stage": {"quant_modifiers": {k: v for m in modifiers for k, v in m.items()}}}


def recipes(ignore: list[str]) -> dict[str, dict]:
    """The recipes compared, in llm-compressor 0.14's shape (AWQ is left out: 0.14's AWQ pins
    memory, which fails without a GPU)."""
    sparse_24 = {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4", "targets": ["Linear"],
                                       "ignore": ["re:.*lm_head", *ignore[1:]]}}
    kv = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    return {
        "w4a16": _recipe(_modifier("QuantizationModifier", "W4A16", ignore)),
        "fp8-dynamic": _recipe(_modifier("QuantizationModifier", "FP8_DYNAMIC", ignore)),
        "w8a8": _recipe(_modifier("QuantizationModifier", "W8A8", ignore)),
        "fp8-static": _recipe(_modifier("QuantizationModifier", "FP8", ignore)),
        "nvfp4": _recipe(_modifier("QuantizationModifier", "NVFP4", ignore)),
        "gptq-w4a16": _recipe(_modifier("GPTQModifier", "W4A16", ignore)),
        "gptq-nvfp4": _recipe(_modifier("GPTQModifier", "NVFP4", ignore)),
        "w4a16-imatrix": _recipe(_modifier("QuantizationModifier", "W4A16", ignore, weight_observer="imatrix_mse")),
        "nvfp4a16-expanded-mse": _recipe(
            _modifier("QuantizationModifier", "NVFP4A16", ignore, weight_observer="nvfp4_expanded_mse")
        ),
        "fp8-kv-cache": _recipe(_modifier("QuantizationModifier", "FP8_DYNAMIC", ignore, kv_cache_scheme=kv)),
        "smoothquant-gptq-w8a8": _recipe(
            {"SmoothQuantModifier": {"smoothing_strength": 0.8}}, _modifier("GPTQModifier", "W8A8", ignore)
        ),
        "sparsegpt-2of4": _recipe(sparse_24),
        "sparsegpt-unstructured": _recipe(
            {"SparseGPTModifier": {"sparsity": 0.6, "targets": [r"re:model.layers.\d+$"], "block_size": 64}}
        ),
        "sparsegpt-2of4-fp8": _recipe(sparse_24, _modifier("QuantizationModifier", "FP8_DYNAMIC", ignore)),
        "quip-w4a16": _recipe({"QuIPModifier": {"transform_block_size": 128, "transform_type": "hadamard"}},
                              _modifier("QuantizationModifier", "W4A16", ignore)),
        "spinquant-w4a16": _recipe({"SpinQuantModifier": {"rotations": ["R1", "R2"], "transform_type": "hadamard"}},
                                   _modifier("QuantizationModifier", "W4A16", ignore)),
        "reap-50": _recipe({"REAPPruningModifier": {"sparsity": 0.5}}),
        "attention-fp8": _recipe({"QuantizationModifier": {"config_groups": {"attention": {
            "targets": ["LlamaAttention"], "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}}}),
    }


CASES = {
    "llama": ["w4a16", "fp8-dynamic", "w8a8", "fp8-static", "nvfp4", "gptq-w4a16", "gptq-nvfp4", "fp8-kv-cache",
              "smoothquant-gptq-w8a8", "w4a16-imatrix", "nvfp4a16-expanded-mse", "sparsegpt-2of4",
              "sparsegpt-unstructured", "sparsegpt-2of4-fp8", "quip-w4a16", "spinquant-w4a16", "attention-fp8"],
    "qwen3": ["gptq-w4a16", "smoothquant-gptq-w8a8"],
    "qwen3_moe": ["reap-50", "sparsegpt-2of4", "w4a16", "gptq-w4a16", "gptq-nvfp4", "fp8-static", "nvfp4", "fp8-kv-cache"],
    "mixtral": ["w4a16"],
    # vision-language: the model class llm-compressor's examples load, calibrated on text
    "qwen3_5_vl": ["w4a16", "gptq-w4a16", "fp8-static"],
}

# run by both interpreters: python RUNNER tool model recipe.yaml out
RUNNER = """
import json, os, sys, torch, transformers
from datasets import Dataset
tool, model, recipe, out = sys.argv[1:5]
ids = torch.randint(4, 2000, (32, 64), generator=torch.Generator().manual_seed(0))
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
oneshot = __import__(tool, fromlist=["oneshot"]).oneshot
extra = {}
if "vision_config" in json.load(open(os.path.join(model, "config.json"))):  # as the examples load one
    extra["processor"] = transformers.AutoTokenizer.from_pretrained(model)
    model = transformers.AutoModelForImageTextToText.from_pretrained(model)
oneshot(model=model, recipe=recipe, dataset=data, num_calibration_samples=32,
        max_seq_length=64, output_dir=out, **extra)
"""


def build_model(arch: str, folder: Path) -> Path:
    """A tiny random model of ``arch`` saved with a tokenizer, once."""
    from llmc import tiny

    if (folder / "config.json").exists():
        return folder
    if arch in tiny.VISION_LANGUAGE:
        tiny.build_vision_language(arch).save_pretrained(folder)
        tiny.build_tokenizer(2048).save_pretrained(folder)
        return folder
    return tiny.save_tiny(folder, arch=arch, hidden_size=128, intermediate_size=256, seed=0)


def compare(mine: Path, peer: Path) -> dict[str, Any]:
    """What differs between two compressed-tensors checkpoints."""
    import torch

    from llmc.testing import load_checkpoint_tensors

    a, b = load_checkpoint_tensors(mine), load_checkpoint_tensors(peer)
    common = sorted(set(a) & set(b))
    differ = {}
    for name in common:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            differ[name] = f"llmc {x.dtype}{tuple(x.shape)}, peer {y.dtype}{tuple(y.shape)}"
        elif not torch.equal(x, y):
            equal = (x == y).float().mean().item()
            relative = ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)).item()
            differ[name] = f"{equal:.0%} equal" + (f", relative {relative:.2g}" if x.is_floating_point() else "")
    configs = [json.loads((d / "config.json").read_text()).get("quantization_config", {}) for d in (mine, peer)]
    return {
        "only_llmc": sorted(set(a) - set(b)),
        "only_peer": sorted(set(b) - set(a)),
        "common": len(common),
        "differ": differ,
        "config": _config_differences(*configs),
    }


# the format's version, and calibration settings that loaders do not read (compressed-tensors
# 0.19 writes the observer it was calibrated with, 0.20 leaves it out)
UNREAD_CONFIG_FIELDS = ("version", "observer", "observer_kwargs")


def _config_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two configs differ, but for fields null on both sides and UNREAD_CONFIG_FIELDS."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in UNREAD_CONFIG_FIELDS or (a.get(key) is None and b.get(key) is None):
                continue
            out += _config_differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [f"{path}: llmc {a!r}, peer {b!r}"]


def run(tool: str, python: str, model: Path, recipe: dict, out: Path, runner: Path) -> None:
    import yaml

    recipe_file = out.with_suffix(".recipe.yaml")  # 0.14 takes a file or YAML text, not a dict
    recipe_file.write_text(yaml.safe_dump(recipe))
    done = subprocess.run([python, str(runner), tool, str(model), str(recipe_file), str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed on {model.name}:\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True, help="an interpreter with llmcompressor installed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmc-peer-diff"))
    parser.add_argument("--only", default="", help="run the cases whose 'model/recipe' name contains this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    runner = args.workdir / "runner.py"
    runner.write_text(RUNNER)
    results = {}
    for arch, names in CASES.items():
        ignore = MOE_IGNORE if arch in ("qwen3_moe", "mixtral") else ["lm_head", "re:.*visual.*"] if arch.endswith("_vl") else ["lm_head"]
        for name in names:
            case = f"{arch}/{name}"
            if args.only not in case:
                continue
            model = build_model(arch, args.workdir / f"model-{arch}")
            outs = {tool: args.workdir / f"{tool}-{arch}-{name}-{time.time_ns()}" for tool in ("llmc", "llmcompressor")}
            run("llmc", sys.executable, model, recipes(ignore)[name], outs["llmc"], runner)
            run("llmcompressor", args.peer_python, model, recipes(ignore)[name], outs["llmcompressor"], runner)
            results[case] = compare(outs["llmc"], outs["llmcompressor"])
            logger.info("%s: %d differ of %d", case, len(results[case]["differ"]), results[case]["common"])
    print(f"\n{'case':32} | {'names':>16} | {'tensors that differ':>20} | config")
    for case, r in results.items():
        names = "same" if not (r["only_llmc"] or r["only_peer"]) else f"{len(r['only_llmc'])} / {len(r['only_peer'])} own"
        print(f"{case:32} | {names:>16} | {len(r['differ']):>9} of {r['common']:<8} | {'; '.join(r['config']) or 'same'}")
    path = ROOT / "tools" / "peer_diff-result.json"  # cases run now replace their earlier results
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**earlier, **results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
