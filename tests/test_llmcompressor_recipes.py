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

# AWQ as a transform (its unset offload_device written as llm-compressor's Sentinel), GPTQ with an
# observer override and an FP8 KV cache (every QuantizationArgs field spelled out)
AWQ_GPTQ_KV = """
default_stage:
  default_modifiers:
    AWQModifier:
      requires_calibration_data: true
      offload_device: !!python/object/apply:llmcompressor.sentinel.Sentinel [not_provided,
        /venv/lib/python3.12/site-packages/llmcompressor/sentinel.py]
      duo_scaling: true
      n_grid: 4
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16_ASYM
      kv_cache_scheme:
        num_bits: 8
        type: float
        symmetric: true
        group_size: null
        strategy: tensor
        block_structure: null
        dynamic: false
        actorder: null
        scale_dtype: null
        zp_dtype: null
        observer: null
        observer_kwargs: {}
      weight_observer: mse
      bypass_divisibility_checks: false
      requires_calibration_data: true
      block_size: 128
      dampening_frac: 0.01
      actorder: static
      batched_quantization: auto
"""


def test_saved_recipes_read_as_written():
    smooth, gptq = Recipe.load(SMOOTHQUANT_GPTQ).modifiers
    assert smooth.mappings[0] == [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
    assert (smooth.smoothing_strength, smooth.index, smooth.start) == (0.8, 0, -1)
    assert gptq.batched_quantization == "auto" and gptq.requires_calibration_data is True
    with pytest.raises(ValueError, match="algorithm"):
        Recipe.load(SMOOTHQUANT_GPTQ.replace("algorithm: smoothquant", "algorithm: logarithmic"))
    awq, gptq = Recipe.load(AWQ_GPTQ_KV).modifiers
    assert awq.offload_device is None and awq.scheme is None
    assert gptq.config.kv_cache_scheme.num_bits == 8
    assert gptq.config.config_groups["group_0"].weights.observer == "mse"
    with pytest.raises(Exception, match="could not determine a constructor|python/object"):
        Recipe.load("stage:\n  mods:\n    QuantizationModifier: !!python/object/apply:os.system ['true']\n")


@pytest.mark.parametrize("recipe", [SMOOTHQUANT_GPTQ, FP8_DYNAMIC, AWQ_GPTQ_KV], ids=["smoothquant-gptq", "fp8-dynamic", "awq-gptq-kv"])
def test_saved_recipes_run_unchanged(recipe, llama_path, tmp_path):
    out = tmp_path / "out"
    oneshot(model=str(llama_path), recipe=recipe, dataset="llmc-docs", num_calibration_samples=8,
            max_seq_length=64, output_dir=str(out))
    expected = {"W8A8": torch.int8, "FP8_DYNAMIC": torch.float8_e4m3fn, "W4A16_ASYM": torch.int32}
    name = "weight_packed" if "W4A16" in recipe else "weight"
    with safe_open(out / "model.safetensors", "pt") as f:
        dtype = f.get_tensor(f"model.layers.0.self_attn.q_proj.{name}").dtype
        kv = "model.layers.0.self_attn.k_scale" in f.keys()
    assert dtype == next(v for k, v in expected.items() if f"scheme: {k}\n" in recipe)
    assert kv == ("kv_cache_scheme" in recipe)
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


# --- llm-compressor 0.14's remaining oneshot arguments ----------------------------------------


def test_propagate_error_is_quantization_aware_calibration():
    from llmc.args import parse_oneshot_args

    assert parse_oneshot_args(model="m", propagate_error=False).pipeline.quantization_aware_calibration is False
    assert parse_oneshot_args(model="m").pipeline.quantization_aware_calibration is True
    noop = parse_oneshot_args(model="m", tracing_ignore=["_update_causal_mask"], sequential_targets_per_subgraph=2,
                              clear_sparse_session=True, overwrite_cache=True)
    assert noop.pipeline.tracing_ignore == ["_update_causal_mask"]


def test_tie_word_embeddings_keeps_ties_unless_lm_head_is_quantized(checkpoint_factory, tmp_path, sample_ids):
    from llmc.modifiers import QuantizationModifier

    gemma = checkpoint_factory("gemma")  # ties its embeddings
    kept = oneshot(model=str(gemma), recipe=QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]),
                   tie_word_embeddings=True, output_dir=str(tmp_path / "tied"))
    assert kept.lm_head.weight is kept.model.embed_tokens.weight
    with safe_open(tmp_path / "tied" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    untied = oneshot(model=str(gemma), recipe=QuantizationModifier(targets="Linear", scheme="W8A16"),
                     tie_word_embeddings=True)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight  # lm_head is quantized
    default = oneshot(model=str(gemma), recipe=QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]))
    assert default.lm_head.weight is not default.model.embed_tokens.weight


def test_quantization_format_overrides_the_inferred_one(llama_path, tmp_path):
    import json

    out = tmp_path / "naive"
    oneshot(model=str(llama_path), recipe=QUANT_W4A16, quantization_format="naive-quantized", output_dir=str(out))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "naive-quantized"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8  # unpacked


QUANT_W4A16 = {"stage": {"quant_modifiers": {"QuantizationModifier": {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}}}}


def test_preprocessing_func_and_remove_columns_shape_the_calibration_rows(tokenizer):
    import datasets

    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader

    data = datasets.Dataset.from_dict({"question": ["What is two?", "Why?"], "answer": ["Two.", "Because."]})
    args = DatasetArguments(
        dataset=data, preprocessing_func=lambda row: {"text": f"Q: {row['question']} A: {row['answer']}"},
        remove_columns=["question", "answer"], shuffle_calibration_samples=False, num_calibration_samples=2,
        pad_to_max_length=False, data_collator="padding",
    )
    batches = list(build_calibration_dataloader(args, tokenizer))
    texts = [tokenizer.decode(ids[mask.bool()]) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert texts == ["Q: What is two? A: Two.", "Q: Why? A: Because."]
    with pytest.raises(ValueError, match="remove_columns names columns the dataset does not have"):
        build_calibration_dataloader(DatasetArguments(dataset=data, remove_columns=["nope"]), tokenizer)


def test_static_activation_scales_calibrate_layer_by_layer_by_default():
    """As in llm-compressor 0.14: the sequential pipeline, not the whole model on the device."""
    from llmc.modifiers import QuantizationModifier
    from llmc.pipelines import resolve_pipelines

    assert resolve_pipelines("independent", [QuantizationModifier(scheme="FP8")]) == ["sequential"]
    assert resolve_pipelines("independent", [QuantizationModifier(scheme="FP8_DYNAMIC")]) == ["datafree"]
