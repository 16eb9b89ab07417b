"""model_free_ptq throughput (GB/s of input) against the practical limit: safetensors read + write.

A Llama-shaped checkpoint of random bf16 weights (``--size-gb``) is written in
shards of ``--shard-mb``; every measurement runs in a fresh subprocess (its own
peak memory) on the same warm files:

* ``copy``: read every tensor with safetensors and write it back, shard by shard,
  ``--workers`` shards at a time: no tool can beat this;
* ``llmc``: ``llmc.model_free_ptq`` for each scheme;
* ``peer``: llm-compressor's ``model_free_ptq`` (with ``--peer-path``, a site
  directory that holds llmcompressor), same checkpoint, workers and device.

Files are read from the page cache (warm: reading runs at memory speed) unless
``--cold``, which drops the page cache before every measurement (root only), so
that reading runs at the disk's speed as for a checkpoint larger than memory.

    python -m benchmarks.model_free --size-gb 1 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import peak_memory, table, write_json

SCHEMES = ["FP8_BLOCK", "NVFP4A16"]
IGNORE = ["lm_head"]


def _config(size_gb: float):
    import transformers

    hidden, inter, vocab = 2048, 8192, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * hidden * 2) / per_layer))
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=16, num_key_value_heads=16, torch_dtype="bfloat16", tie_word_embeddings=False,
    )


def make_checkpoint(path: Path, size_gb: float, shard_mb: int) -> Path:
    """Random bf16 weights in the layout save_pretrained writes, built without the model."""
    import transformers
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").is_file():
        return path
    config = _config(size_gb)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if sizes[-1] and sizes[-1] + nbytes > shard_mb * 2**20:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        sizes[-1] += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
    )
    config.save_pretrained(tmp)
    tmp.rename(path)
    return path


def _copy(src: Path, out: Path, workers: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)

    def one(shard: Path) -> None:
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, sorted(src.glob("*.safetensors"))))


def measure(kind: str, src: Path, out: Path, scheme: str | None, workers: int, device: str | None) -> dict:
    """One measurement, in this (fresh) process."""
    extra: dict = {}
    if kind == "llmc":  # imports are not what is measured
        from llmc.model_free import model_free_ptq
    elif kind == "peer":
        from llmcompressor import model_free_ptq as peer
    start = time.perf_counter()
    if kind == "copy":
        _copy(src, out, workers)
    elif kind == "llmc":
        summary = model_free_ptq(src, out, scheme, ignore=IGNORE, max_workers=workers, device=device)
        extra["phase_worker_seconds"] = summary.phase_seconds
    elif kind == "peer":
        peer(src, out, scheme, ignore=IGNORE, max_workers=workers, device=device)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **peak_memory(), **extra}


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches ({exc}).") from exc


def _subprocess(kind: str, src: Path, scheme: str | None, args: argparse.Namespace) -> dict | None:
    out = Path(tempfile.mkdtemp(dir=args.workdir, prefix=f"out-{kind}-"))
    shutil.rmtree(out)
    if args.cold:
        drop_page_cache()
    env = dict(os.environ, TQDM_DISABLE="1")
    if kind == "peer":
        env["PYTHONPATH"] = os.pathsep.join([args.peer_path, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "benchmarks.model_free", "--measure", kind, "--src", str(src), "--out", str(out),
           "--workers", str(args.workers)]
    if scheme:
        cmd += ["--scheme", scheme]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(f"{kind} {scheme or ''} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--shard-mb", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workdir", default=os.environ.get("LLMC_CACHE", tempfile.gettempdir()))
    parser.add_argument("--peer-path", default=None)
    parser.add_argument("--repeats", type=int, default=1, help="best of N for each row")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each row (root)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scheme", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.src), Path(args.out), args.scheme, args.workers, args.device)))
        return

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    src = make_checkpoint(Path(args.workdir) / f"model-free-{args.size_gb:g}gb-{args.shard_mb}mb", args.size_gb, args.shard_mb)
    nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    shards = len(list(src.glob("*.safetensors")))
    if not args.cold:
        _subprocess("copy", src, None, args)  # warm the page cache for every row alike

    plan = [("copy", None)] + [("llmc", s) for s in SCHEMES]
    if args.peer_path:
        plan += [("peer", s) for s in SCHEMES]
    rows = []
    for kind, scheme in plan:
        results = [r for r in (_subprocess(kind, src, scheme, args) for _ in range(args.repeats)) if r]
        if not results:
            continue
        best = min(results, key=lambda r: r["seconds"])
        rows.append({"tool": kind, "scheme": scheme or "-", **best, "gb_per_s": nbytes / 1e9 / best["seconds"]})
    limit = rows[0]["seconds"]
    for row in rows:
        row["fraction_of_limit"] = limit / row["seconds"]
    columns = ["tool", "scheme", "seconds", "gb_per_s", "fraction_of_limit", "peak_rss_gib", "peak_gpu_gib"]
    cache = "cold" if args.cold else "warm"
    print(f"checkpoint: {nbytes / 1e9:.2f} GB bf16 in {shards} shards, {cache} page cache; "
          f"workers={args.workers} device={args.device or 'auto'}")
    print(table(rows, columns))
    path = write_json("model_free", {"checkpoint_gb": nbytes / 1e9, "shards": shards, "workers": args.workers,
                                     "device": args.device, "page_cache": cache, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
