"""AutoRoundModifier end to end through oneshot and the CLI on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.cli import main
from llmc.testing import assert_same_tensors, load_checkpoint_tensors, quant_recipe

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)

YAML = """
quant_stage:
  quant_modifiers:
    AutoRoundModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: {scheme}
      iters: {iters}
      batch_size: 4
      enable_torch_compile: false
"""


def _recipe(scheme: str = "W4A16", iters: int = 20, **extra) -> dict:
    args = {"targets": ["Linear"], "ignore": ["lm_head"], "scheme": scheme, "iters": iters, "batch_size": 4,
            "enable_torch_compile": False, **extra}
    return {"quant_stage": {"quant_modifiers": {"AutoRoundModifier": args}}}


def test_yaml_recipe_runs_through_the_cli_and_reloads(llama_path, tmp_path, sample_ids):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(YAML.format(scheme="W4A16", iters=10))
    out = tmp_path / "out"
    code = main(["oneshot", "--model", str(llama_path), "--recipe", str(recipe), "--output_dir", str(out),
                 "--dataset", "llmc-docs", "--num_calibration_samples", "8", "--max_seq_length", "64"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert "AutoRoundModifier" in (out / "recipe.yaml").read_text()
    # transformers reloads it (compressed-tensors decompresses); the same function as packed
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(llama_path)
    with torch.no_grad():
        a, b = reloaded(sample_ids).logits, original(sample_ids).logits
    assert not torch.equal(a, b)
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.2


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "NVFP4A16", "FP8_BLOCK"])
def test_one_iteration_is_round_to_nearest(llama_path, tmp_path, scheme):
    """Iteration 0 measures the loss at V = 0 and the full range: with one iteration that is
    what is kept, so the checkpoint is QuantizationModifier's (min-max round-to-nearest)."""
    oneshot(model=str(llama_path), recipe=_recipe(scheme, iters=1), output_dir=str(tmp_path / "ar"), **DATA)
    oneshot(model=str(llama_path), recipe=quant_recipe(scheme), output_dir=str(tmp_path / "rtn"), **DATA)
    if scheme.startswith("NVFP4"):
        # FP4 has a negative zero: packing a small negative weight keeps its sign, packing the
        # rounded value -0.0 does not. Same values; compare with zeros made positive.
        for folder in ("ar", "rtn"):
            tensors = load_checkpoint_tensors(tmp_path / folder)
            save_file({k: _positive_zeros(v) if k.endswith("weight_packed") else v for k, v in tensors.items()},
                      tmp_path / folder / "model.safetensors")
    assert_same_tensors(tmp_path / "ar", tmp_path / "rtn")


def _positive_zeros(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 (two codes a byte) with every -0 (code 8) written as +0 (code 0)."""
    low, high = packed & 0x0F, packed >> 4
    low, high = torch.where(low == 8, 0, low), torch.where(high == 8, 0, high)
    return (low | (high << 4)).to(torch.uint8)


def _output_error(model, reference, batches) -> float:
    with torch.no_grad():
        return sum((model(**b).logits - reference(**b).logits).pow(2).sum().item() for b in batches)


@pytest.mark.parametrize(("scheme", "gain"), [("W4A16", 0.8), ("MXFP4A16", 0.8), ("FP8_BLOCK", 0.99)])
def test_tuning_lowers_each_layers_loss_and_beats_round_to_nearest(llama_path, tmp_path, scheme, gain):
    """FP8's grid is fine already (its 128 × 128 tiles' loss falls by a few percent to a
    quarter); 4-bit grids gain more."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.modifiers import AutoRoundModifier
    from llmc.tiny import build_tokenizer

    modifier = AutoRoundModifier(**_recipe(scheme, iters=40)["quant_stage"]["quant_modifiers"]["AutoRoundModifier"])
    model = oneshot(model=str(llama_path), recipe=modifier, **DATA)
    assert set(modifier.results) == {"model.layers.0", "model.layers.1"}
    assert not modifier._captured  # nothing kept past its layer (the tuning's own calls neither)
    for name, result in modifier.results.items():
        assert result.samples == DATA["num_calibration_samples"], name  # each sequence once
        assert result.best_loss < gain * result.initial_loss, name
        assert len(result.losses) == 40
    rtn = oneshot(model=str(llama_path), recipe=quant_recipe(scheme), **DATA)
    original = AutoModelForCausalLM.from_pretrained(llama_path)
    batches = list(build_calibration_dataloader(DatasetArguments(**DATA), build_tokenizer(2048)))
    assert _output_error(model, original, batches) < gain * _output_error(rtn, original, batches)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"iters": -5}, "iters must be a non-negative integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"scheme": "MXFP8"}, None),
        ({"scheme": "W8A8", "config_groups": None}, None),  # dynamic activations: accepted
        ({"device_ids": "0,1"}, None),  # tuned on oneshot's device, with a warning
    ],
)
def test_bad_arguments_fail_before_the_model_loads(tmp_path, args, match):
    missing = tmp_path / "no-such-model"
    if match is None:  # accepted: the failure is the missing model, after the recipe was read
        with pytest.raises(Exception, match="no-such-model"):
            oneshot(model=str(missing), recipe=_recipe(**args), **DATA)
        return
    with pytest.raises(Exception, match=match):
        oneshot(model=str(missing), recipe=_recipe(**args), **DATA)


def test_static_activation_scales_are_refused(tmp_path):
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32},
                          "input_activations": {"num_bits": 8, "dynamic": False}}}
    recipe = {"s": {"m_modifiers": {"AutoRoundModifier": {"config_groups": groups, "ignore": ["lm_head"]}}}}
    with pytest.raises(Exception, match="static input activation"):
        oneshot(model=str(tmp_path / "no-such-model"), recipe=recipe, **DATA)


@pytest.mark.parametrize("scheme", ["FP8", "W4A16"])
def test_zero_iterations_round_to_nearest_as_quantization_modifier(llama_path, tmp_path, scheme):
    """iters=0 (llm-compressor's AutoRound RTN examples, static FP8 among them): nothing is
    tuned; the checkpoint is QuantizationModifier's, its weight ranges AutoRound's optimized
    round-to-nearest (the mse observer), or the plain min-max range with disable_opt_rtn."""
    from llmc.modifiers import QuantizationModifier

    for opt, observer in ((False, "memoryless_mse"), (True, None)):
        auto = tmp_path / f"auto-{opt}"
        oneshot(model=str(llama_path), recipe=_recipe(scheme=scheme, iters=0, disable_opt_rtn=opt),
                output_dir=str(auto), **DATA)
        plain = tmp_path / f"plain-{opt}"
        weights = {"weight_observer": observer} if observer else {}
        oneshot(model=str(llama_path), recipe=QuantizationModifier(scheme=scheme, ignore=["lm_head"], **weights),
                output_dir=str(plain), **DATA)
        assert_same_tensors(auto, plain)


def test_device_ids_naming_another_device_is_refused(llama_path):
    with pytest.raises(ValueError, match="oneshot\\(device="):
        oneshot(model=str(llama_path), recipe=_recipe(device_ids="meta"), **DATA)


def test_without_the_plugin_the_error_names_the_package(monkeypatch, tmp_path):
    from llmc import plugins

    monkeypatch.setenv(plugins.DISABLE_VARIABLE, "autoround")
    plugins.get_plugin_manager.cache_clear()
    try:
        with pytest.raises(Exception, match="pip install llmc-autoround"):
            oneshot(model=str(tmp_path / "no-such-model"), recipe=_recipe(), **DATA)
    finally:
        plugins.get_plugin_manager.cache_clear()


def test_targets_are_the_unquantized_models_outputs(llama_path):
    """Iteration 0 measures the loss at round-to-nearest (one iteration keeps it), over every
    sample when a batch holds them all: for the second layer that is the error of its output,
    on the inputs the quantized first layer gives, against the unquantized model's own output
    there, computed here by running both models whole."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.modifiers import AutoRoundModifier
    from llmc.tiny import build_tokenizer

    data = dict(DATA, num_calibration_samples=8)
    modifier = AutoRoundModifier(**_recipe(iters=1, batch_size=8)["quant_stage"]["quant_modifiers"]["AutoRoundModifier"])
    quantized = oneshot(model=str(llama_path), recipe=modifier, **data)
    original = AutoModelForCausalLM.from_pretrained(llama_path)

    def second_layer_output(model, batch) -> torch.Tensor:
        seen = []
        handle = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        model(**batch)
        handle.remove()
        return seen[0].double()

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in build_calibration_dataloader(DatasetArguments(**data), build_tokenizer(2048)):
            ours, reference = second_layer_output(quantized, batch), second_layer_output(original, batch)
            total += (ours - reference).pow(2).sum().item()
            count += ours.numel()
    assert modifier.results["model.layers.1"].initial_loss == pytest.approx(total / count, rel=1e-4)
