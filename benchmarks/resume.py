"""What resuming a crashed oneshot costs and saves: GPTQ W4A16 on a Llama-shaped model.

Rows, all from one machine, model, data and recipe:

* ``no progress``: ``resume=False``, the baseline;
* ``every layer``: ``resume_interval=0``, progress saved after every layer (the worst case);
* ``default``: progress saved as ``oneshot`` does by default (``resume_interval`` 60 s, and
  only when a save takes under a tenth of the time since the last);
* ``resumed``: the run killed (SIGKILL) at the middle layer's end with progress saved after
  every layer, then the same command again (default saving): the seconds the rerun takes.
  llm-compressor has no resume: its rerun takes the baseline's time.

``identical``: the checkpoint is byte for byte the baseline's.

Random bf16 weights and random-token calibration (the time does not depend on them).

    python -m benchmarks.resume                                   # GPU machine: ~1B, 16 layers
    python -m benchmarks.resume --hidden 256 --intermediate 512 --layers 4 --samples 8 --seq 64   # CPU smoke
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import table, write_json

KILLED = """
import sys, time, json
from pathlib import Path
from llmc import oneshot
from llmc.hookspecs import hookimpl
from llmc.plugins import get_plugin_manager
kwargs, at, marker = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
class Stop:
    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer):
        if layer_name == at:
            Path(marker).write_text("stopped")
            time.sleep(600)
get_plugin_manager().register(Stop(), name="stop")
oneshot(**kwargs)
"""


def build(path: Path, args: argparse.Namespace) -> None:
    import transformers

    from llmc import tiny

    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512), max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tiny.build_tokenizer(2048).save_pretrained(path)


def dataset(args: argparse.Namespace):
    import datasets

    ids = torch.randint(4, 2048, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def kwargs(model: Path, out: Path, data_path: Path, args: argparse.Namespace, **extra) -> dict:
    recipe = {"s": {"q_modifiers": {"GPTQModifier": {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}}}}
    return dict(model=str(model), recipe=recipe, output_dir=str(out), dataset_path=str(data_path),
                num_calibration_samples=args.samples, max_seq_length=args.seq, **extra)


def timed(**kw) -> float:
    from llmc import oneshot

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    oneshot(**kw)
    return time.perf_counter() - started


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def kill_midway(kw: dict, at: str, marker: Path) -> float:
    import json

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, json.dumps(kw), at, str(marker)])
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise RuntimeError("the run to kill ended before reaching the layer")
            time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        proc.kill()
        proc.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmc-resume-"))
    model, data_path = work / "model", work / "calibration.jsonl"
    if not model.exists():
        build(model, args)
    dataset(args).to_json(data_path)
    # a first run warms the caches (files, kernels) so the rows compare like with like
    timed(**kwargs(model, work / "warm", data_path, args, resume=False))

    rows = []
    baseline = timed(**kwargs(model, work / "baseline", data_path, args, resume=False))
    reference = files(work / "baseline")
    rows.append({"mode": "no progress", "seconds": baseline, "vs baseline": 1.0})
    for mode, extra in (("every layer", {"resume_interval": 0}), ("default", {})):
        seconds = timed(**kwargs(model, work / mode, data_path, args, **extra))
        rows.append({"mode": mode, "seconds": seconds, "vs baseline": seconds / baseline,
                     "identical": files(work / mode) == reference})

    middle = f"model.layers.{args.layers // 2 - 1}"  # half the layers finished when killed
    killed_kw = kwargs(model, work / "resumed", data_path, args, resume_interval=0)
    before_kill = kill_midway(killed_kw, middle, work / "marker")
    rerun = timed(**kwargs(model, work / "resumed", data_path, args))  # the same command, default saving
    rows.append({"mode": "resumed", "seconds": rerun, "vs baseline": rerun / baseline,
                 "identical": files(work / "resumed") == reference, "killed after s": before_kill})

    print(table(rows, ["mode", "seconds", "vs baseline", "identical", "killed after s"]))
    config = {k: v for k, v in vars(args).items() if k != "workdir"}
    print("wrote", write_json("resume", {"config": config, "rows": rows}))


if __name__ == "__main__":
    main()
