"""KV-cache quantization: k/v scales against the keys and values computed directly."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmc import oneshot

FP8_KV = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}


def _samples(count: int = 6, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(4, 2048, (length - i,), generator=g).tolist() for i in range(count)]


def _reference_states(path, samples: list[list[int]]) -> list[dict[str, list[torch.Tensor]]]:
    """Per layer, the queries and keys after RoPE and the values of every sample, from
    transformers' own layers: the unquantized model's hidden states through each attention's
    projections."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rope = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"]).apply_rotary_pos_emb
    layers = model.model.layers
    found: list[dict[str, list[torch.Tensor]]] = [{"q": [], "k": [], "v": []} for _ in layers]
    with torch.no_grad():
        for ids in samples:
            x = torch.tensor([ids])
            hidden = model(x, output_hidden_states=True).hidden_states
            positions = torch.arange(x.shape[1])[None]
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                h = layer.input_layernorm(hidden[i])
                shape = (1, x.shape[1], -1, attn.head_dim)
                q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
                if hasattr(attn, "k_norm"):
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k = q.transpose(1, 2), k.transpose(1, 2)
                v = attn.v_proj(h).view(shape).transpose(1, 2)
                cos, sin = model.model.rotary_emb(h, positions)
                q, k = rope(q, k, cos, sin)
                found[i]["q"].append(q)
                found[i]["k"].append(k)
                found[i]["v"].append(v)
    return found


def _run(path, tmp_path, kv: dict | None, model=None, **recipe_args) -> tuple[torch.nn.Module, dict, dict]:
    samples = _samples()
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"kv_cache_scheme": kv, **recipe_args}}}}
    model = oneshot(
        model=model if model is not None else str(path), recipe=recipe, output_dir=str(tmp_path / "out"),
        dataset=datasets.Dataset.from_dict({"input_ids": samples}), num_calibration_samples=len(samples),
        max_seq_length=64, pad_to_max_length=False, quantization_aware_calibration=False,
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    return model, config, load_file(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_kv_scales_are_the_range_of_the_keys_and_values(checkpoint_factory, tmp_path, arch, strategy):
    path = checkpoint_factory(arch)
    kv = {**FP8_KV, "strategy": strategy, "observer": "static_minmax"}
    _, config, tensors = _run(path, tmp_path, kv)
    assert config["kv_cache_scheme"]["strategy"] == strategy and config["kv_cache_scheme"]["type"] == "float"
    assert config["config_groups"] == {}  # a KV-cache-only recipe quantizes no layer
    reference = _reference_states(path, _samples())
    for i, states in enumerate(reference):
        for base in ("k", "v"):
            values = torch.cat([s.transpose(1, 2).flatten(0, 1) for s in states[base]])  # (tokens, heads, dim)
            absmax = values.abs().amax() if strategy == "tensor" else values.abs().amax(dim=(0, 2))
            saved = tensors[f"model.layers.{i}.self_attn.{base}_scale"]
            expected = (absmax / 448.0).reshape(saved.shape)
            torch.testing.assert_close(saved.float(), expected, rtol=1e-5, atol=0)


def test_kv_cache_with_weight_quantization_and_the_default_observer(llama_path, tmp_path, caplog):
    """With W8A16 layers: one config group, the KV scheme beside it; the in-memory model's
    cache holds keys on the FP8 grid of its k_scale (its observer: the moving average)."""
    kv = {**FP8_KV, "strategy": "tensor"}
    with caplog.at_level(logging.WARNING):
        model, config, tensors = _run(llama_path, tmp_path, kv, scheme="W8A16", ignore=["lm_head"])
    assert list(config["config_groups"]) == ["group_0"] and config["kv_cache_scheme"]["num_bits"] == 8
    assert "model.layers.0.self_attn.k_proj.weight_packed" in tensors
    assert "saw no calibration data" not in caplog.text
    attn = model.model.layers[0].self_attn
    torch.testing.assert_close(attn.k_scale.detach().float(), tensors["model.layers.0.self_attn.k_scale"].float())
    out = model(torch.tensor([_samples()[0]]), use_cache=True)
    keys = out.past_key_values.layers[0].keys.float()
    on_grid = keys / attn.k_scale.float()
    torch.testing.assert_close(on_grid.to(torch.float8_e4m3fn).float(), on_grid)
    assert model.generate(torch.tensor([_samples()[0][:5]]), max_new_tokens=3, do_sample=False).shape[1] == 8


def test_reload_keeps_the_kv_scales(llama_path, tmp_path):
    """transformers' compressed-tensors loader puts the scales back on the attention modules
    (where compressed-tensors recognises the installed transformers' attention)."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    probe = AutoModelForCausalLM.from_pretrained(llama_path)
    if not is_cached_attention_module(probe.model.layers[0].self_attn):
        pytest.skip("this compressed-tensors does not recognise this transformers' attention modules")
    _, _, tensors = _run(llama_path, tmp_path, {**FP8_KV, "strategy": "tensor"}, scheme="W8A16", ignore=["lm_head"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for i, layer in enumerate(reloaded.model.layers):
        for base in ("k", "v"):
            torch.testing.assert_close(getattr(layer.self_attn, f"{base}_scale").float(),
                                       tensors[f"model.layers.{i}.self_attn.{base}_scale"].float())


def test_a_model_without_attention_to_quantize_is_refused(tmp_path):
    from llmc.modifiers.quantization import QuantizationModifier
    from llmc.quantization.kv_cache import apply_kv_cache_scheme

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = type("C", (), {"get_text_config": lambda self, decoder: None})()
    args = QuantizationModifier(kv_cache_scheme={**FP8_KV, "strategy": "tensor"}, scheme="W8A16").config.kv_cache_scheme
    with pytest.raises(ValueError, match="no attention module"):
        apply_kv_cache_scheme(model, args)


def _assert_scales_are_the_ranges(tensors: dict, reference: list, strategy: str, bases: str) -> None:
    for i, states in enumerate(reference):
        for base in bases:
            values = torch.cat([s.transpose(1, 2).flatten(0, 1) for s in states[base]])  # (tokens, heads, dim)
            absmax = values.abs().amax() if strategy == "tensor" else values.abs().amax(dim=(0, 2))
            saved = tensors[f"model.layers.{i}.self_attn.{base}_scale"]
            torch.testing.assert_close(saved.float(), (absmax / 448.0).reshape(saved.shape), rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_an_attention_group_quantizes_queries_keys_and_values(checkpoint_factory, tmp_path, arch, strategy):
    """llm-compressor's attention example: a config group targeting the attention modules with
    input activations alone gives each q_scale, k_scale and v_scale, the ranges of the
    queries and keys after RoPE and of the values; the config keeps the group and writes its
    arguments as kv_cache_scheme."""
    path = checkpoint_factory(arch)
    args = {**FP8_KV, "strategy": strategy, "observer": "static_minmax"}
    attention = "Qwen3Attention" if arch == "qwen3" else "LlamaAttention"
    groups = {"attention": {"targets": [attention], "input_activations": args}}
    _, config, tensors = _run(path, tmp_path, None, config_groups=groups)
    assert list(config["config_groups"]) == ["group_0"]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == [attention] and group["weights"] is None
    assert group["input_activations"]["strategy"] == strategy
    assert config["kv_cache_scheme"] == group["input_activations"]
    assert "attn" not in json.dumps({k: v for k, v in json.loads((tmp_path / "out" / "config.json").read_text()).items() if k != "quantization_config"})
    _assert_scales_are_the_ranges(tensors, _reference_states(path, _samples()), strategy, "qkv")


def test_the_quantized_model_runs_its_queries_on_the_fp8_grid_eager_attention_too(llama_path, tmp_path, monkeypatch):
    """The model oneshot returns fake-quantizes its queries as vLLM's FP8 attention will, with
    the model's eager attention too (which transformers does not register), and generates."""
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32, attn_implementation="eager")
    groups = {"attention": {"targets": ["re:.*self_attn$"], "input_activations": {**FP8_KV, "strategy": "tensor", "observer": "static_minmax"}}}
    model, _, tensors = _run(llama_path, tmp_path, None, model=model, config_groups=groups, ignore=["lm_head"])
    _assert_scales_are_the_ranges(tensors, _reference_states(llama_path, _samples()), "tensor", "q")
    seen = []
    eager = __import__(type(model).__module__, fromlist=["eager_attention_forward"])
    original = eager.eager_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append((module, query))
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(eager, "eager_attention_forward", spy)
    with torch.no_grad():
        model(torch.tensor([_samples()[0]]))
    assert len(seen) == len(model.model.layers)
    for module, query in seen:
        on_grid = query.float() / module.q_scale.float()
        torch.testing.assert_close(on_grid.to(torch.float8_e4m3fn).float(), on_grid)
    assert model.generate(torch.tensor([_samples()[0][:5]]), max_new_tokens=3, do_sample=False).shape[1] == 8
    # the decompressor the benchmarks score with puts the q/k/v scales back and runs alike
    from llmc.evaluation import load_decompressed

    reloaded = load_decompressed(tmp_path / "out", dtype=torch.float32, via_transformers=False)
    ids = torch.tensor([_samples()[1]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_an_attention_group_with_output_activations_is_refused(llama_path, tmp_path):
    args = {**FP8_KV, "strategy": "tensor"}
    groups = {"attn": {"targets": ["re:.*self_attn$"], "input_activations": args, "output_activations": args}}
    with pytest.raises(ValueError, match="input_activations alone"):
        _run(llama_path, tmp_path, None, config_groups=groups)


def test_the_checkpoint_reloads_through_the_decompressor_with_its_kv_scales(llama_path, tmp_path):
    """llmc.evaluation.load_decompressed (what the benchmarks score) puts the k/v scales back
    and runs with the keys and values quantized, whatever the installed transformers reloads."""
    from llmc.evaluation import load_decompressed

    _, _, tensors = _run(llama_path, tmp_path, {**FP8_KV, "strategy": "attn_head"}, scheme="W8A16", ignore=["lm_head"])
    model = load_decompressed(tmp_path / "out", dtype=torch.float32, via_transformers=False)
    attn = model.model.layers[1].self_attn
    torch.testing.assert_close(attn.v_scale.float(), tensors["model.layers.1.self_attn.v_scale"].float())
    out = model(torch.tensor([_samples()[0]]), use_cache=True)
    values = out.past_key_values.layers[1].values.float() / attn.v_scale.float()
    torch.testing.assert_close(values.to(torch.float8_e4m3fn).float(), values)
