"""recipe.yaml files in the shape llm-compressor 0.14 writes them (written here, field by field as
its serializer emits them) run unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from llmc import oneshot
from llmc.recipe import Recipe

# SmoothQuant's mappings come as !!python/tuple; every modifier carries the base fields
SMOOTHQUANT_GPTQ = """
default_stage:
  default_modifiers:
    SmoothQuantModifier:
      index: 0
      group: default
      start: -1
      end: -1
      update: null
      requires_calibration_data: true
      smoothing_strength: 0.8
      mappings:
      - !!python/tuple
        - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']
        - re:.*input_layernorm
      - !!python/tuple
        - ['re:.*gate_proj', 're:.*up_proj']
        - re:.*post_attention_layernorm
      ignore: []
      algorithm: smoothquant
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W8A8
      bypass_divisibility_checks: false
      requires_calibration_data: true
      block_size: 128
      dampening_frac: 0.01
      actorder: static
      batched_quantization: auto
"""

FP8_DYNAMIC = """
default_stage:
  default_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: FP8_DYNAMIC
      bypass_divisibility_checks: false
      requires_calibration_data: false
"""


def test_saved_recipes_read_as_written():
    smooth, gptq = Recipe.load(SMOOTHQUANT_GPTQ).modifiers
    assert smooth.mappings[0] == [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
    assert (smooth.smoothing_strength, smooth.index, smooth.start) == (0.8, 0, -1)
    assert gptq.batched_quantization == "auto" and gptq.requires_calibration_data is True
    with pytest.raises(ValueError, match="algorithm"):
        Recipe.load(SMOOTHQUANT_GPTQ.replace("algorithm: smoothquant", "algorithm: logarithmic"))
    with pytest.raises(Exception, match="could not determine a constructor|python/object"):
        Recipe.load("stage:\n  mods:\n    QuantizationModifier: !!python/object/apply:os.system ['true']\n")


@pytest.mark.parametrize("recipe", [SMOOTHQUANT_GPTQ, FP8_DYNAMIC], ids=["smoothquant-gptq", "fp8-dynamic"])
def test_saved_recipes_run_unchanged(recipe, llama_path, tmp_path):
    out = tmp_path / "out"
    oneshot(model=str(llama_path), recipe=recipe, dataset="llmc-docs", num_calibration_samples=8,
            max_seq_length=64, output_dir=str(out))
    with safe_open(out / "model.safetensors", "pt") as f:
        dtype = f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype
    assert dtype == (torch.int8 if "W8A8" in recipe else torch.float8_e4m3fn)
    # and the recipe llmc saved reruns
    again = tmp_path / "again"
    oneshot(model=str(llama_path), recipe=str(out / "recipe.yaml"), dataset="llmc-docs",
            num_calibration_samples=8, max_seq_length=64, output_dir=str(again))


def test_gptq_solved_one_by_one_matches_batched(llama_path):
    """batched_quantization=False solves each module alone: the same weights as the stacked and
    batched solves, up to floating-point summation order."""
    from llmc.modifiers import GPTQModifier

    def weights(batched):
        model = oneshot(model=str(llama_path), dataset="llmc-docs", num_calibration_samples=8, max_seq_length=64,
                        recipe=GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], batched_quantization=batched))
        return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))}

    alone, together = weights(False), weights("auto")
    for name, w in alone.items():
        differ = (w != together[name]).float().mean().item()
        assert differ < 0.01, (name, differ)
        torch.testing.assert_close(w, together[name], rtol=0, atol=float(w.abs().max()) / 64)
