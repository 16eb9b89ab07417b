"""``llmc demo``: the main job end to end on an embedded default, no download.

Builds and briefly trains a small Llama with its tokenizer, saves it, compresses
it with the strongest installed algorithm, reloads the result through
transformers, and prints how close it stays to the original on held-out text.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
from transformers import AutoModelForCausalLM

from llmc import tiny
from llmc.data import corpus
from llmc.evaluation import compare, eval_batches, weights_size
from llmc.plugins import get_registry

logger = logging.getLogger(__name__)

# calibration data for quantizers that need it (harmless for the others)
DATA: dict[str, Any] = {"dataset": corpus.NAME, "num_calibration_samples": 64, "max_seq_length": 256}


@attrs.frozen
class DemoResult:
    algorithm: str
    scheme: str
    size_before: int
    size_after: int
    perplexity_before: float
    perplexity_after: float
    kl_divergence: float
    top1_agreement: float
    seconds: float
    output_dir: str

    def table(self) -> str:
        rows = [
            ("algorithm", self.algorithm),
            ("scheme", self.scheme),
            ("weights on disk before", f"{self.size_before / 2**20:.2f} MiB"),
            ("weights on disk after", f"{self.size_after / 2**20:.2f} MiB ({self.size_before / self.size_after:.2f}x smaller)"),
            ("held-out perplexity before", f"{self.perplexity_before:.3f}"),
            ("held-out perplexity after", f"{self.perplexity_after:.3f}"),
            ("KL(original || compressed)", f"{self.kl_divergence:.5f} nats/token"),
            ("top-1 agreement", f"{100 * self.top1_agreement:.2f} %"),
            ("oneshot time", f"{self.seconds:.2f} s"),
            ("checkpoint", self.output_dir),
        ]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])


def strongest_algorithm() -> str:
    """The installed quantizing modifier that declares the highest ``strength`` (core's
    round-to-nearest ``QuantizationModifier`` when no plugin adds one)."""
    from llmc.modifiers.quantization import QuantizationModifier

    quantizers = [e.obj for e in get_registry().of_kind("modifier") if issubclass(e.obj, QuantizationModifier)]
    return max(quantizers, key=lambda cls: cls.strength).__name__


def run_demo(workdir: str | Path | None = None, scheme: str = "W4A16", train_steps: int = 100) -> DemoResult:
    """The demo, its checkpoints in ``workdir`` (kept), else in a temporary directory removed
    before this returns."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="llmc-demo-") as tmp:
            return attrs.evolve(_run(Path(tmp), scheme, train_steps), output_dir="(removed; --workdir keeps it)")
    return _run(Path(workdir), scheme, train_steps)


def _run(workdir: Path, scheme: str, train_steps: int) -> DemoResult:
    tokenizer = tiny.build_tokenizer(2048)
    config = tiny.build_config(
        "llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2
    )
    model = tiny.build_model(config, seed=0)
    tiny.train(model, tokenizer, steps=train_steps, seq_len=128, batch_size=8)
    original = workdir / "original"
    model.save_pretrained(original)
    tokenizer.save_pretrained(original)

    algorithm = strongest_algorithm()
    recipe = {
        "demo_stage": {
            "quant_modifiers": {algorithm: {"targets": ["Linear"], "scheme": scheme, "ignore": ["lm_head"]}}
        }
    }
    compressed = workdir / "compressed"
    from llmc import oneshot

    started = time.perf_counter()
    oneshot(model=str(original), recipe=recipe, output_dir=str(compressed), overwrite_output_dir=True, **DATA)
    seconds = time.perf_counter() - started

    reference = AutoModelForCausalLM.from_pretrained(original).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(compressed).eval()
    batches = eval_batches(tokenizer, corpus.split_texts(corpus.EVALUATION), seq_len=128, max_batches=16)
    agreement = compare(reference, reloaded, batches)
    return DemoResult(
        algorithm=algorithm,
        scheme=scheme,
        size_before=weights_size(original),
        size_after=weights_size(compressed),
        perplexity_before=agreement.perplexity_reference,
        perplexity_after=agreement.perplexity,
        kl_divergence=agreement.kl_divergence,
        top1_agreement=agreement.top1_agreement,
        seconds=seconds,
        output_dir=str(compressed),
    )
