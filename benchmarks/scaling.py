"""How oneshot's time and memory grow with model size.

Llama configs from about 50 M to 1 B+ parameters with random weights (speed does not
depend on them), each built in one process and compressed in another, so that the peak
memory reported is oneshot's own.
Prints a table, writes JSON and a PNG plot of seconds and peak memory against parameters.

    python -m benchmarks.scaling                                  # W4A16 round-to-nearest, CPU or GPU
    python -m benchmarks.scaling --recipe w4a16-gptq --samples 32 --seq 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import table, write_json

# (hidden, intermediate, layers, heads, kv_heads): about 50 M, 170 M, 450 M and 1.2 B parameters.
CONFIGS = {
    "50M": (512, 1536, 8, 8, 4),
    "170M": (1024, 2816, 10, 16, 8),
    "450M": (1536, 4096, 14, 16, 8),
    "1.2B": (2048, 5632, 22, 32, 8),
}
RECIPES = {
    "w4a16-rtn": ("QuantizationModifier", False),
    "w4a16-gptq": ("GPTQModifier", True),
}

BUILD = r"""
import json, sys, torch
spec = json.loads(sys.argv[1])
from llmc import tiny
hidden, inter, layers, heads, kv = spec["config"]
config = tiny.build_config("llama", vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv)
model = tiny.build_model(config).to(torch.bfloat16)
model.save_pretrained(spec["model"])
tiny.build_tokenizer(2048).save_pretrained(spec["model"])
print("PARAMETERS", sum(p.numel() for p in model.parameters()))
"""

CHILD = r"""
import json, sys, time, resource, torch
spec = json.loads(sys.argv[1])
from llmc import oneshot
recipe = {"s": {"quant_modifiers": {spec["modifier"]: {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}}}}
extra = dict(dataset="llmc-docs", num_calibration_samples=spec["samples"], max_seq_length=spec["seq"]) if spec["data"] else {}
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
oneshot(model=spec["model"], recipe=recipe, output_dir=spec["out"], **extra)
print("CHILD_RESULT", json.dumps({
    "seconds": time.perf_counter() - started,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
}))
"""


def measure(name: str, recipe: str, samples: int, seq: int) -> dict:
    modifier, data = RECIPES[recipe]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"config": CONFIGS[name], "model": f"{tmp}/model", "out": f"{tmp}/out", "modifier": modifier,
                "data": data, "samples": samples, "seq": seq}
        built = subprocess.run([sys.executable, "-c", BUILD, json.dumps(spec)], capture_output=True, text=True)
        params = next((int(x.split()[1]) for x in built.stdout.splitlines() if x.startswith("PARAMETERS")), None)
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD_RESULT")), None)
    if line is None:
        return {"config": name, "error": proc.stderr.strip().splitlines()[-1][:200]}
    return {"config": name, "parameters": params, **json.loads(line.split(" ", 1)[1])}


def plot(rows: list[dict], recipe: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "seconds" in r]
    params = [r["parameters"] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(params, [r["seconds"] for r in rows], "o-")
    left.set(xlabel="parameters (M)", ylabel="oneshot seconds", title=f"{recipe}: time")
    right.plot(params, [r["peak_rss_gib"] for r in rows], "o-", label="peak RSS")
    if any(r["peak_gpu_gib"] for r in rows):
        right.plot(params, [r["peak_gpu_gib"] for r in rows], "s-", label="peak GPU")
    right.set(xlabel="parameters (M)", ylabel="GiB", title=f"{recipe}: peak memory")
    right.legend()
    for axis in (left, right):
        axis.set_xscale("log")
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="w4a16-rtn")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        rows.append(measure(name, args.recipe, args.samples, args.seq))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, ["config", "parameters", "seconds", "peak_rss_gib", "peak_gpu_gib", "error"]))
    out = write_json(f"scaling-{args.recipe}", {"args": vars(args), "results": rows})
    png = out.with_suffix(".png")
    plot(rows, args.recipe, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
