"""AWQModifier end to end, and its scale search."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.quantization import preset_name_to_scheme
from safetensors.torch import load_file

from llmc import oneshot
from llmc.mappings import fold_scales, resolve_mappings
from llmc_awq.search import fake_quantized, search_scales

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)

YAML = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      ignore: [lm_head]
      scheme: {scheme}
      targets: [Linear]
      duo_scaling: true
      mappings:
        - smooth_layer: re:.*input_layernorm$
          balance_layers: [re:.*q_proj$, re:.*k_proj$, re:.*v_proj$]
        - smooth_layer: re:.*v_proj$
          balance_layers: [re:.*o_proj$]
        - smooth_layer: re:.*post_attention_layernorm$
          balance_layers: [re:.*gate_proj$, re:.*up_proj$]
        - smooth_layer: re:.*up_proj$
          balance_layers: [re:.*down_proj$]
"""


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def error(model, reference, ids):
    return float((logits(model, ids) - reference).pow(2).mean())


def test_search_never_worse_than_rtn_and_uniform_scales_are_one():
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=False)
    gain = torch.ones(256)
    gain[[5, 77, 130, 200]] = 20.0  # a few salient input channels, as in real activations
    x = torch.randn(512, 256) * gain
    result = search_scales(lambda: [linear(x)], [linear], x.abs().mean(0), args, n_grid=20, duo_scaling=True)
    assert result.loss <= result.rtn_loss
    rtn = float((torch.nn.functional.linear(x, fake_quantized(linear.weight.data, args)) - linear(x)).pow(2).mean())
    torch.testing.assert_close(result.rtn_loss, rtn, rtol=1e-4, atol=0)
    assert result.loss < 0.8 * result.rtn_loss  # salient channels protected
    both = search_scales(lambda: [linear(x)], [linear], x.abs().mean(0), args, n_grid=20, duo_scaling="both")
    assert both.loss <= result.loss  # a superset of candidates

    uniform = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        uniform.weight.copy_(torch.sign(torch.randn(64, 256)))
    flat = torch.ones(512, 256)
    result = search_scales(lambda: [uniform(flat)], [uniform], flat.mean(0), args, n_grid=20, duo_scaling=True)
    torch.testing.assert_close(result.scales, torch.ones(256))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_folding_keeps_the_function(checkpoint_factory, arch, sample_ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_factory(arch))
    reference = logits(model, sample_ids)
    resolved = resolve_mappings(model, None, "awq")
    folded = 0
    generator = torch.Generator().manual_seed(0)
    for mapping in resolved:
        if any(b.weight.shape[1] != mapping.smooth.weight.shape[0] for b in mapping.balance):
            continue  # v_proj -> o_proj under grouped-query attention
        fold_scales(mapping, torch.rand(mapping.smooth.weight.shape[0], generator=generator) * 3 + 0.2)
        folded += 1
    assert folded >= 3 * model.config.num_hidden_layers
    torch.testing.assert_close(logits(model, sample_ids), reference, atol=2e-4, rtol=2e-4)


def salient_copy(src, dst):
    """The checkpoint with a few activation channels ~20x larger, as trained models have."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 99]] *= 20.0
    model.save_pretrained(dst)
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_awq_oneshot_beats_rtn(checkpoint_factory, arch, tmp_path, sample_ids):
    path = salient_copy(checkpoint_factory(arch), tmp_path / "src")
    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(path), sample_ids)
    out = tmp_path / "awq"
    awq = oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"AWQModifier": {"ignore": ["lm_head"]}}}},
                  output_dir=str(out), **DATA)
    rtn = oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"QuantizationModifier": {
        "scheme": "W4A16_ASYM", "ignore": ["lm_head"]}}}})
    assert error(awq, reference, sample_ids) < error(rtn, reference, sample_ids)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight_zero_point"].dtype == torch.int32


def test_llm_compressor_yaml_runs_unchanged_and_reloads(llama_path, tmp_path, sample_ids):
    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=YAML.format(scheme="W4A16"), output_dir=str(out), **DATA)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), atol=1e-4, rtol=1e-4)
    assert "AWQModifier" in (out / "recipe.yaml").read_text()


def test_missing_mappings_error(tmp_path):
    path = tmp_path / "gpt2"
    transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=2048)
    ).save_pretrained(path)
    from llmc import tiny

    tiny.build_tokenizer(2048).save_pretrained(path)
    with pytest.raises(ValueError, match="(?s)No default awq mappings for GPT2LMHeadModel.*Pass mappings="):
        oneshot(model=str(path), recipe={"s": {"quant_modifiers": {"AWQModifier": {"ignore": ["lm_head"]}}}}, **DATA)


def test_bad_awq_arguments():
    with pytest.raises(ValueError, match="duo_scaling"):
        oneshot(model="unused", recipe={"s": {"quant_modifiers": {"AWQModifier": {"duo_scaling": "sometimes"}}}})


@pytest.mark.parametrize("quantizer", ["QuantizationModifier", "GPTQModifier"])
def test_awq_as_a_transform_takes_the_next_modifiers_quantization(quantizer, llama_path, tmp_path, caplog):
    """llm-compressor 0.14's shape: AWQ (no scheme) scales, the modifier after it quantizes
    with its own ignore and scheme: lm_head stays dense, one config group."""
    recipe = f"""
quant_stage:
  quant_modifiers:
    AWQModifier: {{n_grid: 4}}
    {quantizer}: {{targets: [Linear], scheme: W4A16_ASYM, ignore: [lm_head]}}
"""
    out = tmp_path / "awq-then-rtn"
    with caplog.at_level("INFO", logger="llmc_awq"):
        model = oneshot(model=str(llama_path), recipe=recipe, output_dir=str(out), **DATA)
    assert f"AWQ scales for {quantizer}'s quantization" in caplog.text
    # 3 mappings a layer searched (v_proj -> o_proj does not fit GQA's shapes), 2 layers
    assert sum("output error" in r.getMessage() for r in caplog.records) == 3 * 2
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 1 and config["ignore"] == ["lm_head"]
    assert list(config["config_groups"].values())[0]["weights"]["symmetric"] is False
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" in tensors and "lm_head.weight_packed" not in tensors
    assert getattr(model.lm_head, "quantization_scheme", None) is None
    # and it is AWQ: scales were folded into the norms the search balanced
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_path)
    norms = [(n, p) for n, p in model.named_parameters() if "layernorm" in n]
    reference = dict(original.named_parameters())
    assert any(not torch.equal(p, reference[n]) for n, p in norms)


def test_awq_alone_without_a_scheme_quantizes_w4a16_asym(llama_path, tmp_path):
    out = tmp_path / "awq"
    oneshot(model=str(llama_path), recipe="quant_stage:\n  quant_modifiers:\n    AWQModifier: {n_grid: 2, ignore: [lm_head]}\n",
            output_dir=str(out), **DATA)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert list(config["config_groups"].values())[0]["weights"]["symmetric"] is False
