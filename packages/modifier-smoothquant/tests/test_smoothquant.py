"""SmoothQuantModifier and the shared mapping registry."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llmc import oneshot, tiny
from llmc.mappings import resolve_mappings
from llmc.testing import needs
from llmc_smoothquant.modifier import smoothing_scales

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)

SMOOTH_ONLY = {"smooth": {"smoothquant_modifiers": {"SmoothQuantModifier": {"smoothing_strength": 0.8}}}}

W8A8_YAML = """
smooth_stage:
  smoothquant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
        - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
        - [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]
quant_stage:
  quant_modifiers:
    {modifier}:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: W8A8
"""


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma", "qwen3_5"])
def test_smoothing_alone_keeps_the_function(checkpoint_factory, arch, sample_ids):
    """Qwen3.5: linear attention layers (their input projections balance the attention norm)
    and norms that scale by 1 + weight."""
    if not hasattr(transformers, tiny.ARCHITECTURES[arch][0]):
        pytest.skip(f"this transformers has no {arch}")
    path = checkpoint_factory(arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    model = oneshot(model=str(path), recipe=SMOOTH_ONLY, **DATA)
    before = reference.model.layers[0].input_layernorm.weight
    after = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(before, after)  # smoothing happened
    torch.testing.assert_close(logits(model, sample_ids), logits(reference, sample_ids), atol=2e-4, rtol=2e-4)


def test_a_vision_language_model_smooths_its_language_model_with_its_mappings(tmp_path, sample_ids):
    """Qwen3.5's vision-language wrapper has no mappings of its own: Qwen3_5ForCausalLM's are
    resolved inside its language model. The function on text is kept, and the vision tower,
    which text calibration never runs, is left as it was."""
    if not hasattr(transformers, "Qwen3_5Config"):
        pytest.skip("this transformers has no Qwen3.5")
    model = tiny.build_vision_language("qwen3_5_vl")
    reference = {name: p.clone() for name, p in model.state_dict().items()}
    before = logits(model, sample_ids)
    tiny.build_tokenizer(2048).save_pretrained(tmp_path)
    oneshot(model=model, tokenizer=str(tmp_path), recipe=SMOOTH_ONLY, **DATA)
    state = model.state_dict()
    assert not torch.equal(state["model.language_model.layers.0.input_layernorm.weight"],
                           reference["model.language_model.layers.0.input_layernorm.weight"])
    tower = [name for name in state if name.startswith("model.visual.")]
    assert tower and all(torch.equal(state[name], reference[name]) for name in tower)
    torch.testing.assert_close(logits(model, sample_ids), before, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.25])
def test_scales_follow_the_formula(alpha):
    act = torch.tensor([4.0, 1.0, 9.0, 0.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 1.0], [0.25, 1.0, -1.0, 1.0]])
    w2 = torch.tensor([[-3.0, 0.5, 0.5, 1.0]])
    weight_max = [3.0, 2.0, 1.0, 1.0]
    # s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), written out per channel
    expected = torch.tensor([a**alpha / w ** (1 - alpha) for a, w in zip([4.0, 1.0, 9.0], weight_max, strict=False)] + [1.0])
    torch.testing.assert_close(smoothing_scales(act, [w1, w2], alpha), expected)  # channel 3 never fired: kept
    with pytest.raises(ValueError, match="smoothing_strength"):
        oneshot(model="unused", recipe={"s": {"smooth_modifiers": {"SmoothQuantModifier": {"smoothing_strength": 1.5}}}})


@pytest.fixture(scope="module")
def outlier_llama(tmp_path_factory):
    """A tiny Llama whose norms produce a few activation channels ~40x larger than the rest."""
    path = tmp_path_factory.mktemp("outlier-llama")
    model = tiny.build_model(tiny.build_config("llama", hidden_size=128, intermediate_size=256))
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 99]] *= 40.0
    model.save_pretrained(path)
    tiny.build_tokenizer(2048).save_pretrained(path)
    return path


def test_smoothing_reduces_w8a8_error_with_outliers(outlier_llama, sample_ids):
    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(outlier_llama), sample_ids)
    quant = {"quant": {"quant_modifiers": {"QuantizationModifier": {"scheme": "W8A8", "ignore": ["lm_head"]}}}}
    plain = oneshot(model=str(outlier_llama), recipe=quant, **DATA)
    smoothed = oneshot(model=str(outlier_llama), recipe={**SMOOTH_ONLY, **quant}, **DATA)
    err_plain = (logits(plain, sample_ids) - reference).pow(2).mean()
    err_smooth = (logits(smoothed, sample_ids) - reference).pow(2).mean()
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)


@pytest.mark.parametrize("modifier", [pytest.param("GPTQModifier", marks=needs("llmc_gptq")), "QuantizationModifier"])
def test_w8a8_yaml_saves_int8_with_dynamic_token_activations(outlier_llama, tmp_path, sample_ids, modifier):
    out = tmp_path / "out"
    model = oneshot(model=str(outlier_llama), recipe=W8A8_YAML.format(modifier=modifier), output_dir=str(out), **DATA)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized"
    assert group["weights"]["num_bits"] == 8 and group["weights"]["type"] == "int"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert "SmoothQuantModifier" in (out / "recipe.yaml").read_text()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), atol=1e-3, rtol=1e-3)


# --- mapping registry ------------------------------------------------------------------

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


def meta_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


ARCH_CASES = {
    "llama": (transformers.LlamaConfig(**SMALL), 2, ("q_proj", "k_proj", "v_proj")),
    "mistral": (transformers.MistralConfig(**SMALL), 2, ("q_proj", "k_proj", "v_proj")),
    "qwen2": (transformers.Qwen2Config(**SMALL), 2, ("q_proj", "k_proj", "v_proj")),
    "qwen3": (transformers.Qwen3Config(**SMALL), 2, ("q_proj", "k_proj", "v_proj")),
    "gemma": (transformers.GemmaConfig(**SMALL, head_dim=8), 2, ("q_proj", "k_proj", "v_proj")),
    "phi3": (transformers.Phi3Config(**SMALL), 2, ("qkv_proj",)),
}


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_default_mappings_resolve_on_each_architecture(arch):
    config, per_layer, first_balance = ARCH_CASES[arch]
    model = meta_model(config)
    resolved = resolve_mappings(model, None, "smoothquant")
    assert len(resolved) == per_layer * config.num_hidden_layers
    first = resolved[0]
    assert first.smooth_name == "model.layers.0.input_layernorm"
    assert tuple(n.rpartition(".")[2] for n in first.balance_names) == first_balance
    assert all(n.startswith("model.layers.0.") for n in first.balance_names)


def test_mapping_errors():
    model = meta_model(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="matches no module"):
        resolve_mappings(model, [[["re:.*q_proj"], "re:.*input_layernorn"]], "smoothquant")
    with pytest.raises(ValueError, match="finds no balance layer"):
        resolve_mappings(model, [[["re:.*qkv_proj"], "re:.*input_layernorm"]], "smoothquant")
    with pytest.raises(ValueError, match="Cannot read mapping"):
        resolve_mappings(model, [["re:.*input_layernorm"]], "smoothquant")
    gpt2 = meta_model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match="(?s)No default smoothquant mappings for GPT2LMHeadModel.*Pass mappings="):
        resolve_mappings(gpt2, None, "smoothquant")
    ignored = resolve_mappings(model, None, "smoothquant", ignore=["re:.*layers\\.1\\..*"])
    assert [m.smooth_name for m in ignored] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
    ]


def test_a_plugin_adds_mappings_for_a_new_architecture(monkeypatch):
    """A model plugin registers mappings through the hook; resolution then finds them."""
    from llmc.hookspecs import hookimpl
    from llmc.mappings import Mapping
    from llmc.plugins import get_plugin_manager

    class GPT2Mappings:
        @hookimpl
        def llmc_register_mappings(self, register):
            m = Mapping("re:.*ln_1", ["re:.*attn\\.c_attn"])
            register("smoothquant", "GPT2LMHeadModel", [m])

    pm = get_plugin_manager()
    plugin = GPT2Mappings()
    pm.register(plugin, name="gpt2-mappings")
    try:
        gpt2 = meta_model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
        resolved = resolve_mappings(gpt2, None, "smoothquant")
        assert [m.balance_names for m in resolved] == [
            ("transformer.h.0.attn.c_attn",),
            ("transformer.h.1.attn.c_attn",),
        ]
    finally:
        pm.unregister(plugin)


@pytest.mark.parametrize("steps", [None, 2])
def test_every_layer_smooths_on_the_max_of_its_first_calibration_steps(outlier_llama, steps):
    """The scales of every layer, from activations maxed here, directly, over the first
    ``num_calibration_steps`` batches (all of them when None): the sequential pipeline replays
    the batches per layer, so each layer counts its own steps. Smoothing keeps the function, so
    the original model's norm outputs are what each layer saw."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader

    alpha = 0.8
    recipe = {"smooth": {"smooth_modifiers": {"SmoothQuantModifier": {"smoothing_strength": alpha, "num_calibration_steps": steps}}}}
    smoothed = oneshot(model=str(outlier_llama), recipe=recipe, **DATA)
    original = transformers.AutoModelForCausalLM.from_pretrained(outlier_llama)
    norms = {f"{i}.{n}": getattr(layer, n) for i, layer in enumerate(original.model.layers)
             for n in ("input_layernorm", "post_attention_layernorm")}
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        current = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
        maxima[name] = torch.maximum(maxima[name], current) if name in maxima else current

    hooks = [m.register_forward_hook(lambda m, a, out, n=n: record(n, out)) for n, m in norms.items()]
    loader = build_calibration_dataloader(DatasetArguments(**DATA), tiny.build_tokenizer(2048))
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if steps is not None and index == steps:
                break
            original(**batch)
    for hook in hooks:
        hook.remove()
    for name, norm in norms.items():
        index, norm_name = name.split(".")
        layer = original.model.layers[int(index)]
        balance = ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
                   if norm_name == "input_layernorm" else [layer.mlp.gate_proj, layer.mlp.up_proj])
        weight_max = torch.stack([b.weight.abs().amax(0) for b in balance]).amax(0)
        scales = maxima[name] ** alpha / weight_max ** (1 - alpha)
        got = getattr(smoothed.model.layers[int(index)], norm_name).weight
        torch.testing.assert_close(got, norm.weight / scales, rtol=1e-4, atol=1e-6, msg=name)


def test_log_equalization_scales_and_llm_compressors_modifier(outlier_llama, sample_ids):
    """0.14's algorithm="log_equalization" (and its LogarithmicEqualizationModifier alias):
    s = max|X| / log2(2 + max|X|), the function kept, W8A8 error below plain W8A8's."""
    from llmc.modifiers.logarithmic_equalization import LogarithmicEqualizationModifier
    from llmc_smoothquant.modifier import log_equalization_scales

    act = torch.tensor([6.0, 1.0, 0.0])
    torch.testing.assert_close(log_equalization_scales(act), torch.tensor([6.0 / 3.0, 1.0 / torch.log2(torch.tensor(3.0)).item(), 1.0]))
    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(outlier_llama), sample_ids)
    smoothed = oneshot(model=str(outlier_llama), recipe=[LogarithmicEqualizationModifier()], **DATA)
    torch.testing.assert_close(logits(smoothed, sample_ids), reference, atol=2e-4, rtol=2e-4)
    quant = {"QuantizationModifier": {"scheme": "W8A8", "ignore": ["lm_head"]}}
    plain = oneshot(model=str(outlier_llama), recipe={"q": {"quant_modifiers": quant}}, **DATA)
    recipe = {"q": {"quant_modifiers": {"SmoothQuantModifier": {"algorithm": "log_equalization"}, **quant}}}
    equalized = oneshot(model=str(outlier_llama), recipe=recipe, **DATA)
    err_plain = (logits(plain, sample_ids) - reference).pow(2).mean()
    err_equalized = (logits(equalized, sample_ids) - reference).pow(2).mean()
    assert err_equalized < 0.5 * err_plain, (err_equalized, err_plain)
