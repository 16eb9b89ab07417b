"""Trained benchmark models: built by a seeded script, cached locally, never downloaded.

    python -m benchmarks.models tiny      # 2 CPU cores, a few minutes
    python -m benchmarks.models small     # the GPU machine

The checkpoint is a cache (``$LLMC_CACHE``, default ``~/.cache/llmc``), reproducible
from this script alone; it is not committed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import attrs
import torch

from llmc import tiny


@attrs.frozen
class Spec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    steps: int
    seq: int
    batch: int
    lr: float
    corpus: str = "llmc-docs"


SPECS = {
    "tiny": Spec(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, vocab=2048, steps=300, seq=128, batch=16, lr=3e-3),
    # ~180 k training tokens: 50 steps (4.5 epochs) stay at the unigram's perplexity, 400 overfit.
    "small": Spec(hidden=1024, intermediate=2816, layers=12, heads=16, kv_heads=8, vocab=4096, steps=150,
                  seq=256, batch=64, lr=1e-3, corpus="llmc-docs-large"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc"))


def model_path(name: str) -> Path:
    return cache_dir() / "benchmark-models" / name


def unigram_perplexity(tokenizer, corpus_name: str) -> float:
    """Held-out perplexity of the calibration split's unigram distribution: the bar to beat."""
    from llmc.data import corpus

    train = tiny.corpus_token_ids(tokenizer, corpus.CALIBRATION, corpus_name)
    held = tiny.corpus_token_ids(tokenizer, corpus.EVALUATION, corpus_name)
    counts = torch.bincount(train, minlength=len(tokenizer)).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held].mean().item())


def build(name: str, device: str | None = None) -> Path:
    """Train (seeded) and save the named model unless its cache already holds it."""
    path = model_path(name)
    if (path / "model.safetensors").exists():
        return path
    spec = SPECS[name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = tiny.build_tokenizer(spec.vocab, spec.corpus)
    config = tiny.build_config(
        "llama", vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
    )
    model = tiny.build_model(config, seed=0)
    started = time.perf_counter()
    losses = tiny.train(model, tokenizer, steps=spec.steps, seq_len=spec.seq, batch_size=spec.batch, lr=spec.lr,
                        device=device, corpus_name=spec.corpus)
    seconds = time.perf_counter() - started
    model.to("cpu")
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({
        "spec": attrs.asdict(spec), "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds, "device": device, "final_loss": sum(losses[-10:]) / 10,
        "unigram_perplexity": unigram_perplexity(tokenizer, spec.corpus),
    }, indent=2))
    tmp.rename(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train and cache a benchmark model.")
    parser.add_argument("name", choices=sorted(SPECS))
    args = parser.parse_args(argv)
    path = build(args.name)
    print(path)
    print((path / "training.json").read_text())


if __name__ == "__main__":
    main()
