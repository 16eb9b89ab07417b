"""oneshot end to end: architectures, bad input before heavy work, atomic saving, re-runs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmc.entrypoints.oneshot as entry
from llmc import oneshot, tiny
from llmc.modifiers.quantization import QuantizationModifier
from llmc.testing import quant_recipe
from tests.conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_round_trip(arch, checkpoint_factory, tmp_path, sample_ids):
    path = checkpoint_factory(arch)
    recipe = quant_recipe("W4A16")
    expected_model = oneshot(model=str(path), recipe=recipe)
    out = tmp_path / "out"
    oneshot(model=str(path), recipe=recipe, output_dir=str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, expected_model(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_are_untied_and_lm_head_quantized(checkpoint_factory, tmp_path, sample_ids):
    path = checkpoint_factory("gemma")
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    out = tmp_path / "out"
    model = oneshot(model=str(path), recipe=quant_recipe("W8A16", ignore=[]), output_dir=str(out))
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight_packed" in tensors and "model.embed_tokens.weight" in tensors
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():  # the first forward decompresses
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()


def test_accepts_a_loaded_model_and_modifier_objects(llama_path, sample_ids):
    model = AutoModelForCausalLM.from_pretrained(llama_path)
    with torch.no_grad():
        before = model(sample_ids).logits
    result = oneshot(model=model, recipe=QuantizationModifier(scheme="W4A16", ignore=["lm_head"]))
    assert result is model
    with torch.no_grad():
        assert (model(sample_ids).logits - before).abs().max() > 1e-4


def test_saved_recipe_reruns_to_identical_tensors(llama_path, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    oneshot(model=str(llama_path), recipe=quant_recipe("NVFP4A16"), output_dir=str(first))
    oneshot(model=str(llama_path), recipe=str(first / "recipe.yaml"), output_dir=str(second))
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


def test_multi_stage_recipe_keeps_earlier_stage(llama_path, tmp_path):
    recipe = {
        "attn_stage": {"q_modifiers": {"QuantizationModifier": {"targets": ["re:.*self_attn.*"], "scheme": "W8A16"}}},
        "mlp_stage": {"q_modifiers": {"QuantizationModifier": {"targets": ["re:.*mlp.*"], "scheme": "W4A16"}}},
    }
    out = tmp_path / "out"
    oneshot(model=str(llama_path), recipe=recipe, output_dir=str(out))
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].shape == (128, 32)  # 8-bit
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].shape == (256, 16)  # 4-bit
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2


def test_dense_save_holds_fake_quantized_weights(llama_path, tmp_path, sample_ids):
    out = tmp_path / "out"
    model = oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out), save_compressed=False)
    tensors = load_file(out / "model.safetensors")
    weight = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert weight.dtype == torch.float32
    scale = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    steps = weight / scale.repeat_interleave(128, dim=1)
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)  # on the int4 grid
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "dense"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_static_input_scale_matches_observed_absmax(llama_path):
    """FP8 static activations: q_proj's input scale is the absmax of what it saw, / 448."""
    kwargs = dict(dataset="llmc-docs", num_calibration_samples=6, max_seq_length=48, shuffle_calibration_samples=False)
    model = oneshot(model=str(llama_path), recipe=quant_recipe("FP8"), **kwargs)

    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.tiny import build_tokenizer

    reference = AutoModelForCausalLM.from_pretrained(llama_path)
    seen = []
    layer = reference.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    loader = build_calibration_dataloader(DatasetArguments(**{k: v for k, v in kwargs.items()}), build_tokenizer(2048))
    with torch.no_grad():
        for batch in loader:
            reference(**batch)
    handle.remove()
    expected = torch.stack(seen).max() / 448.0
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.input_scale.squeeze(), expected)


# --- bad input fails before any heavy work -----------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(entry, "preprocess", refuse)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(recipe=quant_recipe("W9A9")), ValueError, "Unknown quantization scheme"),
        (dict(recipe="q_modifiers:\n  FancyModifier: {scheme: W4A16}\n"), ValueError, "pip install llmc-fancy"),
        (dict(recipe="q_modifiers: [unclosed"), ValueError, "Malformed recipe YAML"),
        (dict(recipe=quant_recipe("W4A16"), pipeline="fancy-pipeline"), LookupError, "Unknown pipeline 'fancy-pipeline'. It is provided by llmc-fancy"),
        (dict(recipe=quant_recipe("FP8")), ValueError, "needs calibration data"),
        (dict(recipe=quant_recipe("W4A16"), saver="zip"), LookupError, "Unknown saver 'zip'"),
        (dict(recipe=quant_recipe("W4A16"), num_calibration_samples=0), ValueError, "positive"),
    ],
)
def test_bad_input_is_refused_early(no_model_loading, fancy_provider, llama_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        oneshot(model=str(llama_path), **kwargs)


def test_nonempty_output_dir_needs_overwrite(no_model_loading, llama_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out))
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_output_dir(llama_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out), overwrite_output_dir=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_model_path_without_weights(no_model_loading, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no weights"):
        oneshot(model=str(tmp_path), recipe=quant_recipe("W4A16"))
    with pytest.raises(ValueError, match="does not exist"):
        oneshot(model=str(tmp_path / "nowhere"), recipe=quant_recipe("W4A16"))


def test_unmatched_patterns_warn(llama_path, caplog):
    recipe = {"s": {"q_modifiers": {"QuantizationModifier": {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head", "re:.*nonexistent.*"]}}}}
    with caplog.at_level(logging.WARNING, logger="llmc"):
        oneshot(model=str(llama_path), recipe=recipe)
    assert any("re:.*nonexistent.*" in r.getMessage() and "matches no module" in r.getMessage() for r in caplog.records)


def test_interrupted_save_leaves_nothing_that_looks_complete(llama_path, tmp_path):
    from llmc.hookspecs import hookimpl
    from llmc.plugins import get_plugin_manager
    from llmc.saving import save_compressed_tensors

    class CrashingSaver:
        @hookimpl
        def llmc_register_savers(self, register):
            def save(model, output_dir, **kwargs):
                save_compressed_tensors(model, output_dir, **kwargs)  # everything written...
                raise KeyboardInterrupt  # ...then the run is interrupted

            register("crashing", save)

    pm = get_plugin_manager()
    plugin = CrashingSaver()
    pm.register(plugin, name="crashing-saver")
    try:
        with pytest.raises(KeyboardInterrupt):
            oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "out"), saver="crashing")
    finally:
        pm.unregister(plugin)
    assert list(tmp_path.iterdir()) == []


def test_log_dir_gets_a_log_file(llama_path, tmp_path):
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), log_dir=str(tmp_path / "logs"))
    (log,) = (tmp_path / "logs").iterdir()
    assert "Stage quant_stage: QuantizationModifier" in log.read_text()


def test_manual_save_pretrained_after_oneshot(llama_path, tmp_path, sample_ids):
    """llm-compressor's second way to save: oneshot without output_dir, then save_pretrained."""
    model = oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"))
    with torch.no_grad():
        expected = model(sample_ids).logits
    out = tmp_path / "manual"
    model.save_pretrained(out, save_compressed=True, max_shard_size="50MB")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert (out / "recipe.yaml").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, expected, atol=1e-4, rtol=1e-4)
    # like transformers: a second save writes into the directory, keeps what else is there
    # (a tokenizer saved first), and drops the shards of the earlier save it does not hold
    tiny.build_tokenizer(2048).save_pretrained(out)
    model.save_pretrained(out, max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    model.save_pretrained(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".manual*"))  # no temporary or lock left beside it


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_output_dir_never_replaces_the_input_model(where, checkpoint_factory, tmp_path):
    import shutil

    model = tmp_path / "models" / "llama"
    shutil.copytree(checkpoint_factory("llama"), model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    out = {"same": model, "inside": model / "quantized", "above": tmp_path / "models"}[where]
    with pytest.raises(ValueError, match="input model's directory"):
        oneshot(model=str(model), recipe=quant_recipe("W8A16"), output_dir=str(out), overwrite_output_dir=True)
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


def test_the_models_code_files_are_copied(llama_path, tmp_path):
    """A remote-code model's .py files go with the checkpoint (trust_remote_code reloads it
    from there); the input directory is only read."""
    import shutil

    source = tmp_path / "model"
    shutil.copytree(llama_path, source)
    (source / "modeling_custom.py").write_text("# the model's own code\n")
    (source / "configuration_custom.py").write_text("# its config class\n")
    for out, save in ((tmp_path / "out", "oneshot"), (tmp_path / "by-hand", "save_pretrained")):
        model = oneshot(model=str(source), recipe=quant_recipe("W4A16"), output_dir=str(out) if save == "oneshot" else None)
        if save == "save_pretrained":
            model.save_pretrained(out)
        assert (out / "modeling_custom.py").read_text() == "# the model's own code\n"
        assert (out / "configuration_custom.py").exists()
    assert sorted(p.name for p in source.glob("*.py")) == ["configuration_custom.py", "modeling_custom.py"]


def test_a_model_dispatched_with_device_map_is_accepted(llama_path, tmp_path):
    """A model loaded with a device_map that offloads layers to CPU and disk (accelerate's
    hooks): its weights come back and the checkpoint equals the plain model's."""
    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(llama_path, device_map=device_map,
                                                      offload_folder=str(tmp_path / "offload"))
    assert dispatched.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    recipe = quant_recipe("W4A16", modifier="GPTQModifier")
    data = dict(dataset="llmc-docs", num_calibration_samples=4, max_seq_length=32)
    oneshot(model=dispatched, recipe=recipe, output_dir=str(tmp_path / "a"), **data)
    oneshot(model=str(llama_path), recipe=recipe, output_dir=str(tmp_path / "b"), **data)
    _same_checkpoint(tmp_path / "a", tmp_path / "b")


def _same_checkpoint(a, b) -> None:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_a_model_offloaded_by_compressed_tensors_is_accepted(checkpoint_factory, tmp_path):
    """A model loaded through compressed-tensors' offloading (what llm-compressor 0.14's
    ``load_context`` does) to disk: its weights come back, plain modules again, a tie kept, and
    the checkpoint equals the plain model's."""
    from compressed_tensors.offload import OffloadCache, load_offloaded_model

    from llmc.model_loading import undispatch

    path = checkpoint_factory("gemma")
    with load_offloaded_model():
        offloaded = AutoModelForCausalLM.from_pretrained(path, device_map="disk", offload_folder=str(tmp_path / "disk"))
    assert offloaded.model.layers[1].mlp.up_proj._parameters.offloaded_values["weight"].device.type == "meta"
    undispatch(offloaded)
    assert not any(isinstance(m._parameters, OffloadCache) for m in offloaded.modules())
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight
    plain = AutoModelForCausalLM.from_pretrained(path)
    expected = plain.state_dict()
    assert offloaded.state_dict().keys() == expected.keys()
    for name, value in offloaded.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, expected[name]), name

    with load_offloaded_model():
        offloaded = AutoModelForCausalLM.from_pretrained(path, device_map="disk", offload_folder=str(tmp_path / "disk2"))
    recipe = quant_recipe("W4A16", modifier="GPTQModifier")
    data = dict(dataset="llmc-docs", num_calibration_samples=4, max_seq_length=32)
    oneshot(model=offloaded, recipe=recipe, output_dir=str(tmp_path / "a"), **data)
    oneshot(model=str(path), recipe=recipe, output_dir=str(tmp_path / "b"), **data)
    _same_checkpoint(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("device_map", ["auto_offload", "disk", None])
def test_load_context_as_in_llm_compressor_examples(llama_path, tmp_path, device_map):
    """``from llmcompressor.utils import load_context`` becomes ``llmc.utils``: inside it,
    from_pretrained with compressed-tensors' offloading device maps loads a plain model on the
    CPU, and oneshot on it writes the checkpoint the model's path gives."""
    from llmc.utils import load_context

    original = AutoModelForCausalLM.from_pretrained
    kwargs = {"device_map": device_map} if device_map else {}
    with load_context():
        model = AutoModelForCausalLM.from_pretrained(llama_path, **kwargs)
    assert AutoModelForCausalLM.from_pretrained == original
    assert not hasattr(model, "hf_device_map")
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    oneshot(model=model, recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "a"))
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "b"))
    _same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_dispatch_for_generation_as_in_llm_compressor_examples(llama_path, sample_ids):
    """``from llmcompressor.utils import dispatch_for_generation`` becomes ``llmc.utils``: the
    compressed model generates what it generated before dispatching."""
    from llmc.utils import dispatch_for_generation

    model = oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"))
    expected = model.generate(sample_ids[:1], max_new_tokens=4, do_sample=False)
    dispatched = dispatch_for_generation(model)
    assert torch.equal(dispatched.generate(sample_ids[:1], max_new_tokens=4, do_sample=False), expected)


def test_data_given_to_a_recipe_that_needs_none_is_not_loaded(llama_path, tmp_path, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise AssertionError("calibration data loaded for a data-free recipe")

    monkeypatch.setattr(entry, "load_calibration_rows", fail)
    with caplog.at_level(logging.INFO, logger="llmc"):
        oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "out"),
                dataset="llmc-docs", num_calibration_samples=4)
    assert "the dataset is not loaded" in caplog.text
    assert (tmp_path / "out" / "config.json").exists()


def test_compressing_module_by_module_on_a_device_writes_the_same_checkpoint(llama_path, tmp_path, monkeypatch):
    """The saver compresses modules kept on the CPU on the GPU when there is one, one module at a
    time (forced onto the CPU here, the same path): the checkpoint equals compressed-tensors'
    own pass, byte for byte."""
    import copy

    from compressed_tensors.compressors.model_compressors.model_compressor import compress_module

    from llmc import saving

    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.bfloat16)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))
    twin = copy.deepcopy(model)
    saving.save_compressed_tensors(model, tmp_path / "whole")
    moved = []
    monkeypatch.setattr(saving, "_compression_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(saving, "compress_module", lambda m, fmt: moved.append(m) or compress_module(m, fmt))
    saving.save_compressed_tensors(twin, tmp_path / "by-module")
    quantized = [m for m in twin.modules() if getattr(m, "quantization_scheme", None) is not None]
    assert moved and len(moved) == len(quantized)
    whole, by_module = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "by-module" / "model.safetensors")
    assert whole.keys() == by_module.keys() and any(k.endswith("weight_packed") for k in whole)
    for key, tensor in whole.items():
        assert torch.equal(tensor, by_module[key]), key
