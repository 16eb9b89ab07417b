"""GPTQModifier end to end through oneshot on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.recipe import RecipeError

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)

YAML = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: {scheme}
      block_size: 64
      dampening_frac: 0.01
"""


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gptq_round_trip(checkpoint_factory, arch, tmp_path, sample_ids):
    path = checkpoint_factory(arch)
    out = tmp_path / "out"
    model = oneshot(model=str(path), recipe=YAML.format(scheme="W4A16"), output_dir=str(out), **DATA)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "weight"  # the 'static' default
    assert "GPTQModifier" in (out / "recipe.yaml").read_text()


def test_gptq_differs_from_rtn_and_fits_better(llama_path):
    """On the same calibration data, GPTQ's layer outputs are closer to the original's than RTN's."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.tiny import build_tokenizer

    gptq = oneshot(model=str(llama_path), recipe=YAML.format(scheme="W4A16"), **DATA)
    rtn = oneshot(model=str(llama_path), recipe=YAML.format(scheme="W4A16").replace("GPTQModifier", "QuantizationModifier").replace("      block_size: 64\n      dampening_frac: 0.01\n", ""))
    original = AutoModelForCausalLM.from_pretrained(llama_path)
    loader = build_calibration_dataloader(DatasetArguments(**DATA), build_tokenizer(2048))
    errors = {"gptq": 0.0, "rtn": 0.0}
    with torch.no_grad():
        for batch in loader:
            ref = original(**batch).logits
            errors["gptq"] += (gptq(**batch).logits - ref).pow(2).sum().item()
            errors["rtn"] += (rtn(**batch).logits - ref).pow(2).sum().item()
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_w8a8_and_asym_and_channel(llama_path, tmp_path):
    for scheme in ("W8A8", "W4A16_ASYM"):
        out = tmp_path / scheme
        oneshot(model=str(llama_path), recipe=YAML.format(scheme=scheme), output_dir=str(out), **DATA)
        tensors = load_file(out / "model.safetensors")
        if scheme == "W8A8":
            assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
        else:
            assert "model.layers.0.mlp.down_proj.weight_zero_point" in tensors
    recipe = {"s": {"m_modifiers": {"GPTQModifier": {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel", "symmetric": True}}}, "ignore": ["lm_head"], "actorder": None}}}}
    model = oneshot(model=str(llama_path), recipe=recipe, **DATA)
    assert model.model.layers[0].mlp.up_proj.weight_scale.shape == (256, 1)


def test_gptq_on_basic_pipeline_matches_sequential_without_qac(llama_path):
    """Without quantization-aware calibration both pipelines see the same Hessians.

    On the CPU, where both run the same kernels; GPU kernels differ by batch shape and GPTQ
    turns float noise into different rounding choices."""
    common = dict(recipe=YAML.format(scheme="W4A16"), quantization_aware_calibration=False, device="cpu", **DATA)
    a = oneshot(model=str(llama_path), pipeline="basic", **common)
    b = oneshot(model=str(llama_path), pipeline="sequential", **common)
    for (name, ma), (_, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        if isinstance(ma, torch.nn.Linear) and hasattr(ma, "weight_scale"):
            torch.testing.assert_close(ma.weight, mb.weight, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("scheme", ["NVFP4A16", "NVFP4"])
def test_gptq_nvfp4_as_llm_compressor_runs_it(llama_path, tmp_path, scheme):
    """GPTQ with NVFP4 (llm-compressor 0.14's examples do): a fused group (q/k/v, gate/up)
    shares one global scale, round-to-nearest's; on text of the calibration corpus the
    reloaded checkpoint is closer to the original model than round-to-nearest's."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.tiny import build_tokenizer

    text = list(build_calibration_dataloader(DatasetArguments(**{**DATA, "num_calibration_samples": 32}), build_tokenizer(2048)))
    original = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16)
    errors, scales = {}, {}
    for modifier in ("GPTQModifier", "QuantizationModifier"):
        out = tmp_path / modifier
        recipe = YAML.format(scheme=scheme).replace("GPTQModifier", modifier)
        if modifier == "QuantizationModifier":
            recipe = recipe.replace("      block_size: 64\n      dampening_frac: 0.01\n", "")
        oneshot(model=str(llama_path), recipe=recipe, output_dir=str(out), **DATA)
        tensors = load_file(out / "model.safetensors")
        scales[modifier] = {k: v for k, v in tensors.items() if k.endswith("weight_global_scale")}
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            errors[modifier] = sum(
                (reloaded(**batch).logits.float() - original(**batch).logits.float()).pow(2).mean().item() for batch in text
            )
    layer = "model.layers.1.self_attn."
    gptq = scales["GPTQModifier"]
    assert torch.equal(gptq[layer + "q_proj.weight_global_scale"], gptq[layer + "v_proj.weight_global_scale"])
    assert gptq.keys() == scales["QuantizationModifier"].keys()
    assert all(torch.equal(v, scales["QuantizationModifier"][k]) for k, v in gptq.items())
    assert errors["GPTQModifier"] < 0.9 * errors["QuantizationModifier"], errors


def test_bad_gptq_arguments():
    with pytest.raises(RecipeError, match="actorder='group' was removed"):
        oneshot(model="unused", recipe=YAML.format(scheme="W4A16") + "      actorder: group\n")
    with pytest.raises(RecipeError, match="block_size must be positive"):
        oneshot(model="unused", recipe=YAML.format(scheme="W4A16").replace("block_size: 64", "block_size: 0"))


@pytest.mark.parametrize("actorder", ["static", None])
@pytest.mark.parametrize("batched", [True, False])
def test_first_layer_equals_gptq_on_hessians_computed_directly(llama_path, batched, actorder):
    """Layer 0 sees the original model's activations, so each of its Linears must come out as
    the solve of its weight against X^T X summed here, directly, over the calibration batches:
    q/k/v (and gate/up) share one input, and each must be solved with all of it, not with what
    an earlier member's solve left of a shared Hessian."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.tiny import build_tokenizer
    from llmc_gptq.solver import gptq_quantize

    recipe = YAML.format(scheme="W4A16") + f"      batched_quantization: {str(batched).lower()}\n"
    recipe += f"      actorder: {actorder or 'null'}\n"
    quantized = oneshot(model=str(llama_path), recipe=recipe, device="cpu", **DATA)
    original = AutoModelForCausalLM.from_pretrained(llama_path)
    layer = original.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    grams = {n: torch.zeros(layer.get_submodule(n).in_features, layer.get_submodule(n).in_features, dtype=torch.float64) for n in names}

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        grams[name] += x.T @ x

    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: accumulate(n, a[0])) for n in names]
    with torch.no_grad():
        for batch in build_calibration_dataloader(DatasetArguments(**DATA), build_tokenizer(2048)):
            original(**batch)
    for hook in hooks:
        hook.remove()
    for name in names:
        module = quantized.model.layers[0].get_submodule(name)
        args = module.quantization_scheme.weights
        expected = gptq_quantize(layer.get_submodule(name).weight.detach(), grams[name].float(), args,
                                 block_size=64, dampening_frac=0.01, actorder=args.actorder is not None,
                                 scale_dtype=module.weight_scale.dtype)
        steps = ((module.weight - expected.weight).abs() > 1e-6).float().mean().item()
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert steps == 0, (name, steps)  # the modules that share a Hessian
        else:  # o_proj reads attention computed apart, whose last bits move a value or two
            assert steps < 0.02, (name, steps)
