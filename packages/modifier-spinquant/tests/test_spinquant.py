"""SpinQuantModifier on tiny decoders: the rotations leave the model's function unchanged, and a
quantized checkpoint with its transforms reproduces the model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmc import oneshot


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("rotations", [["R1", "R2"], ["R1", "R2", "R4"], ["R2"]])
def test_rotations_leave_the_function_unchanged(checkpoint_factory, sample_ids, arch, rotations):
    from llmc.modifiers import SpinQuantModifier

    path = checkpoint_factory(arch)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rotated = oneshot(model=str(path), recipe=[SpinQuantModifier(rotations=rotations)], pipeline="datafree")
    layer, before = rotated.model.layers[0], original.model.layers[0]
    assert not torch.allclose(layer.self_attn.v_proj.weight, before.self_attn.v_proj.weight)
    if "R1" in rotations:  # the norms' scales are folded into the Linears they feed
        assert bool((layer.input_layernorm.weight == 1).all()) and bool((rotated.model.norm.weight == 1).all())
    with torch.no_grad():
        torch.testing.assert_close(rotated(sample_ids).logits, original(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_quantized_checkpoint_with_its_transforms_reproduces_the_model(llama_path, tmp_path, sample_ids):
    from llmc.evaluation import load_decompressed
    from llmc.modifiers import QuantizationModifier, SpinQuantModifier

    out = tmp_path / "out"
    recipe = [SpinQuantModifier(rotations=["R1", "R2", "R4"]), QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    model = oneshot(model=str(llama_path), recipe=recipe, pipeline="datafree", output_dir=str(out))
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["quantization_config"]["transform_config"]["config_groups"]) == ["R1", "R2", "R4"]
    assert config["tie_word_embeddings"] is False
    reloaded = load_decompressed(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_r3_needs_attention_hooks_compressed_tensors_recognises(llama_path):
    """compressed-tensors hooks attention through transformers' cache argument of the day: where
    it does not recognise it, R3 is refused before anything is rotated."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    from llmc.modifiers import SpinQuantModifier

    probe = AutoModelForCausalLM.from_pretrained(llama_path)
    if is_cached_attention_module(probe.model.layers[0].self_attn):
        pytest.skip("this compressed-tensors recognises this transformers' attention")
    with pytest.raises(ValueError, match="R3 rotates queries and keys"):
        oneshot(model=str(llama_path), recipe=[SpinQuantModifier(rotations=["R1", "R3"])], pipeline="datafree")


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"rotations": ["R5"]}, ValueError, "rotations"),
        ({"learnable": True}, NotImplementedError, "learnable"),
        ({"randomize": True}, NotImplementedError, "randomize"),
    ],
)
def test_bad_arguments_are_refused(arguments, error, message):
    from llmc.modifiers import SpinQuantModifier

    with pytest.raises(error, match=message):
        SpinQuantModifier(**arguments)


def test_custom_mappings_from_a_recipe(llama_path, sample_ids):
    """Mappings given as YAML data (the default Llama ones here, spelled out) work alike."""
    import attrs

    from llmc_spinquant.mappings import DEFAULT, DEFAULT_NORMS

    recipe = {"s": {"t_modifiers": {"SpinQuantModifier": {
        "mappings": attrs.asdict(DEFAULT), "norm_mappings": [attrs.asdict(n) for n in DEFAULT_NORMS],
    }}}}
    original = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    rotated = oneshot(model=str(llama_path), recipe=recipe, pipeline="datafree")
    with torch.no_grad():
        torch.testing.assert_close(rotated(sample_ids).logits, original(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_llm_compressor_import_path():
    from llmc.modifiers import SpinQuantModifier
    from llmc.modifiers.transform import SpinQuantModifier as transform

    assert SpinQuantModifier is transform
