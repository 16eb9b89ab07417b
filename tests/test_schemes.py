"""Every preset scheme: oneshot -> save -> transformers reload -> same logits as fake-quant."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.testing import quant_recipe

CALIBRATION = dict(dataset="llmc-docs", num_calibration_samples=8, max_seq_length=64)

# scheme -> (format, {tensor suffix: (dtype, shape for q_proj of a 128x128 weight)}, needs data)
EXPECTED = {
    "W8A16": ("pack-quantized", {"weight_packed": (torch.int32, [128, 32]), "weight_scale": (torch.float32, [128, 1])}, False),
    "W4A16": ("pack-quantized", {"weight_packed": (torch.int32, [128, 16]), "weight_scale": (torch.float32, [128, 1])}, False),
    "W4A16_ASYM": ("pack-quantized", {"weight_packed": (torch.int32, [128, 16]), "weight_zero_point": (torch.int32, [16, 1])}, False),
    "FP8_DYNAMIC": ("float-quantized", {"weight": (torch.float8_e4m3fn, [128, 128]), "weight_scale": (torch.float32, [128, 1])}, False),
    "FP8_BLOCK": ("float-quantized", {"weight": (torch.float8_e4m3fn, [128, 128]), "weight_scale": (torch.float32, [1, 1])}, False),
    "NVFP4A16": ("nvfp4-pack-quantized", {"weight_packed": (torch.uint8, [128, 64]), "weight_scale": (torch.float8_e4m3fn, [128, 8]), "weight_global_scale": (torch.float32, [1])}, False),
    "MXFP4": ("mxfp4-pack-quantized", {"weight_packed": (torch.uint8, [128, 64]), "weight_scale": (torch.uint8, [128, 4])}, False),
    "W8A8": ("int-quantized", {"weight": (torch.int8, [128, 128]), "weight_scale": (torch.float32, [128, 1])}, False),
    "FP8": ("float-quantized", {"weight": (torch.float8_e4m3fn, [128, 128]), "input_scale": (torch.float32, [1])}, True),
    "NVFP4": ("nvfp4-pack-quantized", {"weight_packed": (torch.uint8, [128, 64]), "input_global_scale": (torch.float32, [1])}, True),
}


# compressed-tensors decompresses these to bfloat16 whatever the model dtype: FP4 schemes are tested on bfloat16 models.
PRECISION = {"MXFP4": "bfloat16", "NVFP4": "bfloat16", "NVFP4A16": "bfloat16"}


# transformers 5.23 cannot load asymmetric pack-quantized checkpoints: compressed-tensors leaves
# the zero point unpacked when it builds the model on the meta device (llm-compressor issue #1618);
# transformers 5.17 (the GPU machine's) loads them. Not strict, so both versions pass.
# test_asym_checkpoint_decompresses checks that checkpoint through compressed-tensors directly.
UPSTREAM_RELOAD_BUG = {"W4A16_ASYM"}


def _params(scheme):
    marks = []
    if scheme in UPSTREAM_RELOAD_BUG:
        marks.append(pytest.mark.xfail(strict=False, reason="some transformers versions cannot reload asymmetric pack-quantized"))
    return pytest.param(scheme, marks=marks)


@pytest.mark.parametrize("scheme", [_params(s) for s in sorted(EXPECTED)])
def test_scheme_round_trip(scheme, llama_path, tmp_path, sample_ids):
    fmt, tensors, needs_data = EXPECTED[scheme]
    extra = dict(CALIBRATION if needs_data else {}, precision=PRECISION.get(scheme, "auto"))
    fake_quant = oneshot(model=str(llama_path), recipe=quant_recipe(scheme), **extra)
    with torch.no_grad():
        expected = fake_quant(sample_ids).logits.float()

    out = tmp_path / "out"
    oneshot(model=str(llama_path), recipe=quant_recipe(scheme), output_dir=str(out), **extra)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = reloaded(sample_ids).logits.float()
    tol = 1e-4 if scheme not in PRECISION else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)

    # The scheme really changed the function (not a silent no-op)...
    original = AutoModelForCausalLM.from_pretrained(llama_path)
    with torch.no_grad():
        assert (original(sample_ids).logits - got).abs().max() > 1e-4

    # ...and the checkpoint holds the packed tensors with the expected layout.
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.self_attn.q_proj."
        for suffix, (dtype, shape) in tensors.items():
            tensor = f.get_tensor(prefix + suffix)
            assert tensor.dtype == dtype, suffix
            assert list(tensor.shape) == shape, suffix
        assert "lm_head.weight" in keys  # ignored, stays dense

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == fmt
    assert config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]
    QuantizationConfig.model_validate(config)  # matches the compressed-tensors schema
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()


def test_asym_checkpoint_decompresses(llama_path, tmp_path):
    """Decompressing the saved W4A16_ASYM tensors gives back the fake-quantized weights."""
    from compressed_tensors.compressors import BaseCompressor

    fake_quant = oneshot(model=str(llama_path), recipe=quant_recipe("W4A16_ASYM"))
    out = tmp_path / "out"
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16_ASYM"), output_dir=str(out))
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    checked = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, module in fake_quant.named_modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            state = {k.removeprefix(name + "."): f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
            weight = compressor.decompress(state, scheme)["weight"]
            expected = module.weight_scale.repeat_interleave(128, dim=1) * (
                torch.clamp(torch.round(module.weight / module.weight_scale.repeat_interleave(128, dim=1))
                            + module.weight_zero_point.repeat_interleave(128, dim=1), -8, 7)
                - module.weight_zero_point.repeat_interleave(128, dim=1)
            )
            torch.testing.assert_close(weight.float(), expected.float(), atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked == 14


def test_load_decompressed_reads_asym_checkpoints(llama_path, tmp_path, sample_ids):
    """The evaluation loader: compressed-tensors' decompressor where transformers cannot reload."""
    from llmc.evaluation import load_decompressed

    out = tmp_path / "out"
    fake_quant = oneshot(model=str(llama_path), recipe=quant_recipe("W4A16_ASYM"), output_dir=str(out))
    dense = load_decompressed(out, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(dense(sample_ids).logits, fake_quant(sample_ids).logits, atol=1e-5, rtol=1e-5)
