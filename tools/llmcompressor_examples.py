"""llm-compressor's example scripts, run through llmc with only ``llmcompressor`` renamed.

Each script runs in its own process as a user would run it, with these things stood in for what
this machine cannot reach: a model id on the hub loads a tiny local model of its family (Llama,
Qwen3-MoE, Mixtral, DeepSeek-V3, GLM-4-MoE, Qwen3-Next, MiniMax-M2, Cohere2-MoE, GLM-5, and the
vision-language Qwen3.5/3.6, Qwen3-VL-MoE, Gemma 4 and Llama 4 from ``llmc.tiny``; random weights),
``datasets.load_dataset`` and auto-round's ``get_dataset`` return local rows (``messages``,
``text``, ``prompt``, ``instruction``/``output``, ``conversations`` columns), a tokenizer stands
in for a multimodal processor on text, a tokenizer without a chat template gets a plain one, the
scripts' sample counts, sequence lengths and generation lengths are cut to seconds, and without a
GPU a script's ``"cuda"`` device is the CPU. Everything else (the recipe, the modifiers' arguments, ``oneshot``'s
arguments, ``load_context``, ``model.save_pretrained``, generation) is the script's own.

    git clone https://github.com/vllm-project/llm-compressor /tmp/llm-compressor
    python tools/llmcompressor_examples.py --repo /tmp/llm-compressor              # every text example
    python tools/llmcompressor_examples.py --repo /tmp/llm-compressor --only awq

Multimodal, distributed (``torchrun``) and disk-offloading scripts are left out: their models
and launchers have no tiny local stand-in here. A failure prints the last error line; the JSON
(``tools/llmcompressor_examples-result.json``) keeps every script's outcome.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("llmc.examples")

LEFT_OUT = ("multimodal", "ddp", "distributed", "disk_offloading", "big_models", "vision", "_vl", "vl_", "audio",
            "whisper", "omni", "llava", "pixtral", "idefics", "mllama", "internvl", ".claude", "benchmark")

# run in the example's process: python RUNNER models_dir example.py
RUNNER = r'''
import os, re, sys
import datasets, torch, transformers

models, example = sys.argv[1:3]
source = open(example).read().replace("llmcompressor", "llmc")
source = re.sub(r"NUM_CALIBRATION_SAMPLES\s*=\s*\d+", "NUM_CALIBRATION_SAMPLES = 16", source)
source = re.sub(r"MAX_SEQUENCE_LENGTH\s*=\s*\d+", "MAX_SEQUENCE_LENGTH = 64", source)
source = re.sub(r"max_new_tokens=\d+", "max_new_tokens=4", source)
if not torch.cuda.is_available():  # scripts that name the GPU run on the CPU
    source = re.sub(r"""(device\s*=\s*|\.to\()["']cuda(:\d+)?["']""", r'\1"cpu"', source)


def local(model_id):
    name = str(model_id)
    if os.path.exists(name):
        return name
    low = name.lower()
    families = (("qwen3-vl-30b-a3b", "qwen3_vl_moe"), ("qwen3.6", "qwen3_5_moe_vl"), ("qwen3.5", "qwen3_5_vl"), ("qwen3.8-27b", "qwen3_5_vl"),
                ("llama-4", "llama4_vl"), ("gemma-4-26b-a4b", "gemma4_moe_vl"), ("gemma-4", "gemma4_vl"), ("qwen3-next", "qwen3_next"), ("minimax", "minimax_m2"),
                ("north-mini", "cohere2_moe"), ("glm-5", "glm_moe_dsa"),
                ("mixtral", "mixtral"), ("deepseek-v4", "deepseek_v4"), ("deepseek", "deepseek_v3"), ("glm-4", "glm4_moe"), ("moe", "qwen3_moe"),
                ("a3b", "qwen3_moe"), ("30b", "qwen3_moe"))
    family = next((family for key, family in families if key in low), "llama")
    return os.path.join(models, family)


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


class TextProcessor:
    """A tokenizer standing in for a multimodal processor on text: chat contents given as
    parts ({"type": "text", ...}) are joined, and processor_kwargs reach the tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, text=None, images=None, **kwargs):
        return self.tokenizer(*args, text=text, **kwargs) if text is not None else self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages, processor_kwargs=None, tokenize=False, **kwargs):  # a processor's default
        def plain(content):
            return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)

        messages = [{**m, "content": plain(m["content"])} for m in messages]
        extra = dict(processor_kwargs or {})
        extra.pop("add_special_tokens", None)
        return self.tokenizer.apply_chat_template(messages, tokenize=tokenize, **kwargs, **extra)


def wrap(owner, attr, tokenizer=False):
    original = getattr(owner, attr)

    def patched(*args, **kwargs):
        args = list(args)
        if args:
            args[0] = local(args[0])
        for key in ("pretrained_model_name_or_path", "model_stub"):
            if key in kwargs:
                kwargs[key] = local(kwargs[key])
        try:
            made = original(*args, **kwargs)
        except OSError:  # a tiny stand-in has no image processor: its tokenizer stands in for the processor
            if not tokenizer:
                raise
            made = TextProcessor(transformers.AutoTokenizer.from_pretrained(*args, **kwargs))
        if tokenizer and getattr(made, "chat_template", None) is None:
            made.chat_template = TEMPLATE
        return made

    setattr(owner, attr, patched)


wrap(transformers.AutoModelForCausalLM, "from_pretrained")
wrap(transformers.AutoModelForImageTextToText, "from_pretrained")
_pretrained = transformers.PreTrainedModel.from_pretrained.__func__


def _from_pretrained(cls, name, *args, **kwargs):  # Qwen3_5ForConditionalGeneration.from_pretrained(id)
    return _pretrained(cls, local(name), *args, **kwargs)


transformers.PreTrainedModel.from_pretrained = classmethod(_from_pretrained)
_processor = transformers.ProcessorMixin.from_pretrained.__func__


def _processor_from_pretrained(cls, name, *args, **kwargs):  # Llama4Processor.from_pretrained(id)
    try:
        return _processor(cls, local(name), *args, **kwargs)
    except (OSError, TypeError, ValueError):  # the stand-in has a tokenizer only
        return TextProcessor(transformers.AutoTokenizer.from_pretrained(local(name)))


transformers.ProcessorMixin.from_pretrained = classmethod(_processor_from_pretrained)
wrap(transformers.AutoTokenizer, "from_pretrained", tokenizer=True)
wrap(transformers.AutoProcessor, "from_pretrained", tokenizer=True)
import llmc
wrap(llmc, "model_free_ptq")

WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing "
         "matches and a calibration corpus keeps its words plain ").split()


def load_dataset(*args, split=None, **kwargs):
    count = 64
    if split and "[:" in str(split):
        count = min(count, int(re.search(r"\[:(\d+)", str(split)).group(1)))
    rows = []
    for i in range(count):
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60))
        rows.append({"messages": [{"role": "user", "content": text[:120]}, {"role": "assistant", "content": text[120:]}],
                     "text": text, "prompt": text, "instruction": text[:80], "output": text[80:], "input": "",
                     "response": text[80:], "conversations": [{"from": "human", "value": text[:120]},
                                                              {"from": "gpt", "value": text[120:]}]})
    data = datasets.Dataset.from_list(rows)
    return data if split is not None else datasets.DatasetDict({"train": data, "train_sft": data, "test": data})


datasets.load_dataset = load_dataset


def get_dataset(tokenizer, seqlen, dataset_name=None, seed=42, nsamples=512):
    """auto_round.calib_dataset.get_dataset (which reads pile-10k from the hub): rows of exactly
    seqlen tokens with their attention mask, from the local rows."""
    ids = [t for row in load_dataset(split="train") for t in tokenizer(row["text"])["input_ids"]]
    ids = (ids * (1 + nsamples * seqlen // max(len(ids), 1)))[: nsamples * seqlen]
    rows = [{"input_ids": ids[i * seqlen:(i + 1) * seqlen], "attention_mask": [1] * seqlen} for i in range(nsamples)]
    return datasets.Dataset.from_list(rows)


import types
auto_round = types.ModuleType("auto_round")
auto_round.calib_dataset = types.ModuleType("auto_round.calib_dataset")
auto_round.calib_dataset.get_dataset = get_dataset
sys.modules.setdefault("auto_round", auto_round)
sys.modules.setdefault("auto_round.calib_dataset", auto_round.calib_dataset)
sys.argv = [example]
exec(compile(source, example, "exec"), {"__name__": "__main__"})
'''


TEXT_FAMILIES = ("llama", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "qwen3_next", "minimax_m2",
                 "cohere2_moe", "glm_moe_dsa", "deepseek_v4")


def build_models(folder: Path) -> None:
    """Tiny random models (with a tokenizer) of the families the examples use."""
    from llmc import tiny

    for arch in TEXT_FAMILIES:
        if not (folder / arch / "config.json").exists():
            # four GLM layers: GLM-4.7's and GLM-5's recipes leave their three dense layers out
            glm = {"num_hidden_layers": 4, "first_k_dense_replace": 3} if arch.startswith("glm") else {}
            # North-Mini (Cohere2-MoE) normalizes by RMS, as SpinQuant's example needs
            rms = {"rms_norm_eps": 1e-5} if arch == "cohere2_moe" else {}
            tiny.save_tiny(folder / arch, arch=arch, hidden_size=128, intermediate_size=256, seed=0, **glm, **rms)
    for arch in tiny.VISION_LANGUAGE:
        if not (folder / arch / "config.json").exists():
            tiny.build_vision_language(arch).save_pretrained(folder / arch)
            tiny.build_tokenizer(2048).save_pretrained(folder / arch)


def last_error(output: str) -> str:
    lines = [line for line in output.splitlines() if ("Error" in line or "error:" in line) and not line.startswith(" ")]
    return lines[-1][:300] if lines else output.strip().splitlines()[-1][:300] if output.strip() else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of llm-compressor")
    parser.add_argument("--only", default="", help="run the examples whose path contains this")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per example")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    examples = sorted(
        p for p in (args.repo / "examples").rglob("*.py")
        if args.only in str(p) and not any(part in str(p.relative_to(args.repo)) for part in LEFT_OUT)
    )
    work = Path(tempfile.mkdtemp(prefix="llmc-examples-"))
    build_models(work / "models")
    runner = work / "runner.py"
    runner.write_text(RUNNER)
    results = {}
    for example in examples:
        name = str(example.relative_to(args.repo))
        cwd = work / "runs" / name.replace("/", "_")
        cwd.mkdir(parents=True)
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(runner), str(work / "models"), str(example)], cwd=cwd,
                                  capture_output=True, text=True, timeout=args.timeout)
            ok, error = done.returncode == 0, "" if done.returncode == 0 else last_error(done.stderr + done.stdout)
        except subprocess.TimeoutExpired:
            ok, error = False, f"timed out after {args.timeout} s"
        results[name] = {"ok": ok, "seconds": round(time.perf_counter() - started, 1), "error": error}
        logger.info("%s %s %s", "ok  " if ok else "FAIL", name, error)
    passed = sum(r["ok"] for r in results.values())
    print(f"\n{passed} of {len(results)} examples ran through llmc")
    path = ROOT / "tools" / "llmcompressor_examples-result.json"  # examples run now replace their earlier results
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**earlier, **results}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
