"""SparseGPTModifier end to end through oneshot on tiny models, with llm-compressor's recipes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.testing import load_checkpoint_tensors
from llmc_sparsegpt.prune import sparsegpt_prune_batch

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)

# llm-compressor's 2:4 recipes (its e2e tests' Sparse_2of4 and WNA16_2of4 shapes)
TWO_OF_FOUR = """
sparsity_stage:
  run_type: oneshot
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
"""
FP8 = """
quantization_stage:
  run_type: oneshot
  quantization_modifiers:
    QuantizationModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: "FP8_DYNAMIC"
"""


def _follows_two_of_four(weight: torch.Tensor) -> bool:
    return bool(((weight.float() == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all())


def _linear_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.endswith("proj.weight")}


def test_two_of_four_then_fp8_saves_sparse_fp8_weights_that_reload(llama_path, tmp_path, sample_ids):
    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=TWO_OF_FOUR + FP8, output_dir=str(out), **DATA)
    tensors = load_file(out / "model.safetensors")
    weights = _linear_weights(tensors)
    assert len(weights) == 14
    for name, weight in weights.items():
        assert weight.dtype == torch.float8_e4m3fn, name
        assert _follows_two_of_four(weight), name
    assert float((tensors["lm_head.weight"] == 0).float().mean()) < 0.01
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    recipe = (out / "recipe.yaml").read_text()
    assert "SparseGPTModifier" in recipe and "2:4" in recipe
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_layer_zero_equals_the_solve_on_a_plain_forwards_hessian(llama_path, tmp_path):
    """Layer 0 sees the original model's inputs: its pruned weights are the solver's on the
    Hessian of those inputs, computed here from a plain forward of the same batches."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.tiny import build_tokenizer

    original = AutoModelForCausalLM.from_pretrained(llama_path)
    inputs: dict[str, list[torch.Tensor]] = {"q_proj": [], "down_proj": []}
    layer = original.model.layers[0]
    layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs["q_proj"].append(a[0]))
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs["down_proj"].append(a[0]))
    with torch.no_grad():
        for batch in build_calibration_dataloader(DatasetArguments(**DATA), build_tokenizer(2048)):
            original(**batch)
    out = tmp_path / "sparse"
    oneshot(model=str(llama_path), recipe=TWO_OF_FOUR, output_dir=str(out), **DATA)
    saved = load_checkpoint_tensors(out)
    for name, module in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]]).float()
        expected = sparsegpt_prune_batch(module.weight.detach()[None], (x.T @ x)[None], 0.5, 2, 4)[0].weight
        got = saved[f"model.layers.0.{'self_attn' if name == 'q_proj' else 'mlp'}.{name}.weight"]
        assert float(((got == 0) == (expected == 0)).float().mean()) > 0.999, name
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_sparse_alone_saves_dense_tensors_without_quantization_config(llama_path, tmp_path, sample_ids):
    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=TWO_OF_FOUR, output_dir=str(out), **DATA)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    for name, weight in _linear_weights(load_checkpoint_tensors(out)).items():
        assert weight.dtype == torch.float32 and _follows_two_of_four(weight), name
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits)


def test_decoder_layers_as_targets_with_a_sparsity_each(llama_path):
    """llm-compressor's unstructured form: targets name the decoder layers; a list gives one
    sparsity per matched layer."""
    from llmc.modifiers import SparseGPTModifier

    modifier = SparseGPTModifier(sparsity=[0.3, 0.7], targets=[r"re:model.layers.\d+$"], block_size=64)
    model = oneshot(model=str(llama_path), recipe=[modifier], **DATA)
    for index, target in enumerate([0.3, 0.7]):
        for name, module in model.model.layers[index].named_modules():
            if isinstance(module, torch.nn.Linear):
                assert float((module.weight == 0).float().mean()) == pytest.approx(target, abs=0.01), name
    assert float((model.lm_head.weight == 0).float().mean()) < 0.01


def test_sparsegpt_then_gptq_keeps_two_of_four(llama_path, tmp_path, sample_ids):
    """llm-compressor's WNA16_2of4 recipe: SparseGPT, then GPTQ with channel scales. GPTQ keeps
    the pruned weights at zero (llm-compressor 0.13 and later fill them in)."""
    gptq = """
quantization_stage:
  run_type: oneshot
  quantization_modifiers:
    GPTQModifier:
      ignore: ["lm_head"]
      actorder: null
      config_groups:
        group_0:
          weights: {num_bits: 4, type: "int", symmetric: true, strategy: "channel"}
          targets: ["Linear"]
"""
    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=TWO_OF_FOUR + gptq, output_dir=str(out), **DATA)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert "SparseGPTModifier" in (out / "recipe.yaml").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)
    for name, module in model.named_modules():
        if name.endswith("proj"):
            assert _follows_two_of_four(module.weight), name


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"sparsity": [0.5, 0.5, 0.5], "targets": [r"re:model.layers.\d+$"]}, "one value per matched module"),
        ({"targets": ["Linear"]}, "needs sparsity"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 0.5, "mask_structure": "4:2"}, "mask_structure"),
        ({"sparsity": 0.5, "sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08}, "OWL"),
        ({"sparsity": 0.5, "targets": ["re:nothing$"]}, "select no Linear layer"),
        ({"sparsity": 0.5, "block_sizes": 4}, "Did you mean 'block_size'"),
    ],
)
def test_bad_arguments_are_refused_before_calibration(llama_path, arguments, message, monkeypatch):
    import llmc_sparsegpt.modifier as modifier

    monkeypatch.setattr(modifier.HessianAccumulator, "attach", lambda *a: pytest.fail("calibration started"))
    recipe = {"stage": {"sparsity_modifiers": {"SparseGPTModifier": arguments}}}
    with pytest.raises((ValueError, TypeError), match=message):
        oneshot(model=str(llama_path), recipe=recipe, **DATA)


def test_llm_compressor_import_paths():
    from llmc.modifiers import SparseGPTModifier
    from llmc.modifiers.obcq import SparseGPTModifier as legacy
    from llmc.modifiers.pruning import SparseGPTModifier as pruning
    from llmc.modifiers.pruning.sparsegpt import SparseGPTModifier as sparsegpt

    assert SparseGPTModifier is legacy is pruning is sparsegpt


def test_moe_experts_are_pruned_and_the_router_is_left(checkpoint_factory, tmp_path):
    pytest.importorskip("llmc_moe")
    path = checkpoint_factory("qwen3_moe")
    recipe = {"s": {"m_modifiers": {"SparseGPTModifier": {
        "sparsity": 0.5, "mask_structure": "2:4", "targets": ["Linear"], "ignore": ["re:.*lm_head", "re:.*mlp.gate$"],
    }}}}
    out = tmp_path / "out"
    oneshot(model=str(path), recipe=recipe, output_dir=str(out), **DATA)
    tensors = load_checkpoint_tensors(out)
    experts = {k: v for k, v in tensors.items() if ".experts." in k and k.endswith("weight")}
    assert experts, sorted(tensors)[:10]
    for name, weight in experts.items():
        assert _follows_two_of_four(weight.reshape(-1, weight.shape[-1])), name
    routers = [v for k, v in tensors.items() if k.endswith("mlp.gate.weight")]
    assert routers and all(float((r == 0).float().mean()) < 0.01 for r in routers)
