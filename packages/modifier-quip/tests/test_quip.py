"""QuIPModifier on a tiny Llama: the rotations leave the model's function unchanged, and the
quantized checkpoint with its transforms reproduces the model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmc import oneshot


def _recipe(**quip):
    from llmc.modifiers import QuantizationModifier, QuIPModifier

    return [QuIPModifier(**quip), QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]


@pytest.mark.parametrize("transform_type, rotations", [("hadamard", ["v"]), ("random-hadamard", ["v", "u"]), ("random-matrix", ["v"])])
def test_rotations_leave_the_function_unchanged(llama_path, sample_ids, transform_type, rotations):
    from llmc.modifiers import QuIPModifier

    original = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    rotated = oneshot(model=str(llama_path), recipe=[QuIPModifier(transform_type=transform_type, rotations=rotations)])
    weight = rotated.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(weight, original.model.layers[0].mlp.down_proj.weight)  # the inverse is fused in
    with torch.no_grad():
        torch.testing.assert_close(rotated(sample_ids).logits, original(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_quantized_checkpoint_with_its_transforms_reproduces_the_model(llama_path, tmp_path, sample_ids):
    from llmc.evaluation import load_decompressed

    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=_recipe(transform_block_size=64, transform_type="hadamard"),
                    pipeline="datafree", output_dir=str(out))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = config["transform_config"]["config_groups"]["v"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 64
    assert [a["location"] for a in scheme["apply"]] == ["input", "weight_input"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    reloaded = load_decompressed(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"rotations": ["w"]}, ValueError, "rotations"),
        ({"learnable": True}, NotImplementedError, "learnable"),
        ({"randomize": True}, NotImplementedError, "randomize"),
        ({"transform_type": "haar"}, ValueError, "transform_type"),
    ],
)
def test_bad_arguments_are_refused(arguments, error, message):
    from llmc.modifiers import QuIPModifier

    with pytest.raises(error, match=message):
        QuIPModifier(**arguments)


def test_a_block_size_that_does_not_divide_the_hidden_size_is_refused(llama_path):
    with pytest.raises(ValueError, match="does not divide the hidden size"):
        oneshot(model=str(llama_path), recipe=_recipe(transform_block_size=96), pipeline="datafree")


def test_llm_compressor_import_path():
    from llmc.modifiers import QuIPModifier
    from llmc.modifiers.transform import QuIPModifier as transform

    assert QuIPModifier is transform
