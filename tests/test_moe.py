"""MoE models end to end: every expert quantized by every modifier, saved under the checkpoint's
names, reloaded; model_free_ptq writes what oneshot writes; fused weights are never silently kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from llmc import model_free_ptq, oneshot, tiny
from llmc.fused_weights import UnquantizedFusedWeightsError
from llmc.mappings import resolve_mappings
from llmc.testing import assert_same_tensors, load_checkpoint_tensors, quant_recipe
from llmc_moe import linearize

IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*mlp.router$"]
EXPERTS, LAYERS = 4, 2


def _save(model: torch.nn.Module, path: Path) -> Path:
    for p in model.parameters():  # transformers leaves some fused experts at zero
        if p.ndim == 3:
            p.data.normal_(0, 0.05)
    model.save_pretrained(path)
    tiny.build_tokenizer(2048).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    """Qwen3-MoE saved as transformers saves it: one tensor per expert and projection."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=EXPERTS,
        num_experts_per_tok=2, moe_intermediate_size=128,
    )
    torch.manual_seed(0)
    return _save(transformers.AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("qwen3-moe"))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    """gpt-oss, whose checkpoints hold fused 3-D experts (interleaved gate/up, biases)."""
    config = transformers.GptOssConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=EXPERTS,
        num_experts_per_tok=2, layer_types=["full_attention"] * LAYERS,
    )
    torch.manual_seed(0)
    return _save(transformers.AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("gpt-oss"))


def keys(folder: Path) -> set[str]:
    found: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            found.update(handle.keys())
    return found


def run(model: Path | torch.nn.Module, out: Path, recipe, **kwargs) -> torch.nn.Module:
    defaults = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)
    model = str(model) if isinstance(model, Path) else model
    return oneshot(model=model, recipe=recipe, output_dir=str(out), **{**defaults, **kwargs})


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_gptq_quantizes_every_expert_and_reloads(qwen3_moe, tmp_path, sample_ids):
    out = tmp_path / "gptq"
    recipe = quant_recipe("W4A16", ignore=IGNORE, modifier="GPTQModifier")
    model = run(qwen3_moe, out, recipe, pipeline="sequential")
    saved = keys(out)
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                prefix = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                assert {f"{prefix}.weight_packed", f"{prefix}.weight_scale", f"{prefix}.weight_shape"} <= saved
    assert not [k for k in saved if "experts" in k and k.endswith(".weight")]
    assert "model.layers.0.mlp.gate.weight" in saved  # the router, ignored, stays dense
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert list(groups.values())[0]["weights"]["num_bits"] == 4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), rtol=1e-4, atol=1e-4)


def test_load_context_linearizes_experts_as_in_llm_compressor_examples(qwen3_moe, tmp_path):
    """0.14's ``load_context`` loads MoE models with linearized experts: llmc's does too (through
    llmc-moe's patch), and oneshot on that model writes the checkpoint the model's path gives."""
    from llmc.utils import load_context
    from llmc_moe import LinearExperts

    with load_context():
        model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe, device_map="auto_offload")
    assert all(isinstance(layer.mlp.experts, LinearExperts) for layer in model.model.layers)
    assert model.model.layers[0].mlp.experts[1].down_proj.weight.shape == (128, 128)
    recipe = quant_recipe("W4A16", ignore=IGNORE, modifier="GPTQModifier")
    run(model, tmp_path / "a", recipe)
    run(qwen3_moe, tmp_path / "b", recipe)
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


def test_autoround_tunes_every_expert_and_reloads(qwen3_moe, tmp_path, sample_ids):
    """AutoRound on an MoE layer: the tuning forward routes tokens as the model does, every
    expert a token reaches is tuned (its weights leave round-to-nearest), all are packed."""
    from llmc.modifiers import AutoRoundModifier

    out = tmp_path / "autoround"
    modifier = AutoRoundModifier(targets=["Linear"], scheme="W4A16", ignore=IGNORE, iters=20, batch_size=4,
                                 enable_torch_compile=False)
    model = run(qwen3_moe, out, modifier)
    run(qwen3_moe, tmp_path / "rtn", quant_recipe("W4A16", ignore=IGNORE))
    for name, result in modifier.results.items():
        assert result.best_loss < result.initial_loss, name
    saved, reference = load_checkpoint_tensors(out), load_checkpoint_tensors(tmp_path / "rtn")
    changed = 0
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight_packed"
                changed += not torch.equal(saved[key], reference[key])
    assert changed == LAYERS * EXPERTS * 3  # with 16 x 64 tokens every expert gets some
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), rtol=1e-4, atol=1e-4)


def test_fused_experts_are_refused_without_a_patch(qwen3_moe, tmp_path, monkeypatch):
    """Core alone: a recipe targeting Linear on fused experts stops before calibration."""
    monkeypatch.setattr("llmc.model_loading.matching_patches", lambda model: [])
    monkeypatch.setattr("llmc.fused_weights.plugin_packages", lambda: {"llmc"}, raising=False)
    monkeypatch.setattr("llmc.plugins.plugin_packages", lambda: {"llmc"})
    calibrated = []
    monkeypatch.setattr("llmc.entrypoints.oneshot.build_calibration_dataloader", lambda *a: calibrated.append(1))
    with pytest.raises(UnquantizedFusedWeightsError) as info:
        run(qwen3_moe, tmp_path / "refused", quant_recipe("W4A16", ignore=IGNORE))
    message = str(info.value)
    assert "model.layers.0.mlp.experts (Qwen3MoeExperts: gate_up_proj (4, 256, 128)" in message
    assert "pip install llmc-moe" in message and "allow_unquantized_fused_weights=True" in message
    assert not calibrated and not (tmp_path / "refused").exists()

    out = tmp_path / "allowed"
    run(qwen3_moe, out, quant_recipe("W4A16", ignore=IGNORE), allow_unquantized_fused_weights=True)
    saved = keys(out)  # transformers writes the fused experts back per expert, dense
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in saved
    assert not [k for k in saved if "experts" in k and k.endswith("weight_packed")]
    # ignoring the experts on purpose is allowed too
    run(qwen3_moe, tmp_path / "ignored", quant_recipe("W4A16", ignore=[*IGNORE, "re:.*experts$"]))


def test_model_free_splits_fused_experts_as_oneshot_does(gpt_oss, tmp_path):
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys(gpt_oss)  # fused on disk
    for scheme in ("W4A16", "NVFP4A16"):
        a, b = tmp_path / f"oneshot-{scheme}", tmp_path / f"free-{scheme}"
        oneshot(model=str(gpt_oss), recipe=quant_recipe(scheme, ignore=IGNORE), output_dir=str(a))
        summary = model_free_ptq(gpt_oss, b, scheme, ignore=IGNORE)
        assert summary.quantized == LAYERS * (4 + 3 * EXPERTS)
        assert_same_tensors(a, b)
    tensors = load_checkpoint_tensors(tmp_path / "free-NVFP4A16")
    for expert in range(EXPERTS):
        prefix = f"model.layers.1.mlp.experts.{expert}"
        gate, up = tensors[f"{prefix}.gate_proj.weight_global_scale"], tensors[f"{prefix}.up_proj.weight_global_scale"]
        assert torch.equal(gate, up)  # one fused gate/up matmul in the engine
        assert f"{prefix}.up_proj.bias" in tensors


def test_smoothquant_balances_experts_and_router_without_changing_the_function(qwen3_moe, tmp_path, sample_ids):
    reference = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe)
    recipe = {"smooth_stage": {"smooth_modifiers": {"SmoothQuantModifier": {"smoothing_strength": 0.8}}}}
    model = run(qwen3_moe, tmp_path / "sq", recipe)
    torch.testing.assert_close(logits(model, sample_ids), logits(reference, sample_ids), rtol=2e-3, atol=2e-3)
    assert_router_sees_what_it_saw(model, reference)


def test_awq_scales_and_quantizes_every_expert(qwen3_moe, tmp_path, sample_ids, monkeypatch):
    import llmc_awq.modifier

    recipe = {"quant_stage": {"quant_modifiers": {"AWQModifier": {"targets": ["Linear"], "scheme": "W4A16_ASYM", "ignore": IGNORE, "n_grid": 4}}}}
    reference = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe)
    searches = []
    real_search = llmc_awq.modifier.search_scales

    def search(measure, balance, *args, **kwargs):
        searches.append((len(balance), real_search(measure, balance, *args, **kwargs)))
        return searches[-1][1]

    monkeypatch.setattr(llmc_awq.modifier, "search_scales", search)
    model = run(qwen3_moe, tmp_path / "awq", recipe, save_compressed=False)
    # the norm's mapping scales every expert's gate and up projections at once (the experts run
    # stacked): each candidate is measured with its own weights, so quantizing them shows
    norm_searches = [result for balanced, result in searches if balanced == 2 * EXPERTS]
    assert len(norm_searches) == LAYERS and all(r.rtn_loss > 0 for r in norm_searches)
    expert = model.model.layers[1].mlp.experts[3]
    assert expert.down_proj.quantization_scheme is not None
    assert_router_sees_what_it_saw(model, reference, scaled=False)
    # about as close to the original as round-to-nearest (AWQ optimises each layer's error, not
    # the logits, on this random model)
    rtn = run(qwen3_moe, tmp_path / "rtn", quant_recipe("W4A16_ASYM", ignore=IGNORE), save_compressed=False)
    want = logits(reference, sample_ids)
    awq_error = (logits(model, sample_ids) - want).pow(2).mean()
    rtn_error = (logits(rtn, sample_ids) - want).pow(2).mean()
    assert awq_error <= 1.25 * rtn_error, (awq_error, rtn_error)


def assert_router_sees_what_it_saw(model: torch.nn.Module, reference: torch.nn.Module, scaled: bool = True) -> None:
    """The norm's scales were folded into the router too: routing is unchanged. ``scaled``:
    the scales are known to differ from 1 (SmoothQuant); AWQ's search may keep s = 1."""
    for new, old in zip(model.model.layers, reference.model.layers, strict=True):
        before = old.mlp.gate.weight * old.post_attention_layernorm.weight
        after = new.mlp.gate.weight * new.post_attention_layernorm.weight
        if scaled:
            assert not torch.allclose(new.mlp.gate.weight, old.mlp.gate.weight)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
def test_moe_default_mappings_cover_experts_and_router(algorithm):
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    linearize(model)
    resolved = {m.smooth_name: m.balance_names for m in resolve_mappings(model, None, algorithm, ignore=IGNORE)}
    mlp = resolved["model.layers.0.post_attention_layernorm"]
    assert "model.layers.0.mlp.gate" in mlp  # ignored for quantization, still scaled
    assert {f"model.layers.0.mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")} <= set(mlp)
    if algorithm == "awq":
        assert resolved["model.layers.0.mlp.experts.2.up_proj"] == ("model.layers.0.mlp.experts.2.down_proj",)


def test_fused_family_checkpoint_reloads_through_the_decompressor(gpt_oss, tmp_path, sample_ids, caplog):
    """gpt-oss: transformers cannot put per-expert tensors back into fused experts; the
    decompressor path rebuilds the linearized model and gives the fake-quantized logits."""
    from llmc.evaluation import load_decompressed

    out = tmp_path / "gpt-oss-w4a16"
    with caplog.at_level("WARNING", logger="llmc_moe"):
        model = run(gpt_oss, out, quant_recipe("W4A16", ignore=IGNORE))
    assert "will not reload through AutoModelForCausalLM" in caplog.text
    reloaded = load_decompressed(out, torch.float32)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), rtol=1e-4, atol=1e-4)


def test_mixtral_saves_under_its_original_checkpoint_names_and_reloads(tmp_path, sample_ids):
    config = transformers.MixtralConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    src = _save(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "mixtral")
    out = tmp_path / "mixtral-w4a16"
    model = run(src, out, quant_recipe("W4A16", ignore=IGNORE))
    saved = keys(out)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in saved  # Mixtral's own names
    assert not [k for k in saved if ".mlp." in k]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("all_experts", [True, False])
def test_nvfp4_static_inputs_on_every_expert(qwen3_moe, tmp_path, all_experts, caplog):
    """NVFP4 with observed input global scales: every expert gets finite, positive scales (an
    expert no token reached takes its siblings' range), an expert's gate and up share their
    weight global scale, and the checkpoint decompresses to the fake-quantized expert weights."""
    out = tmp_path / "nvfp4"
    args = dict(
        recipe=quant_recipe("NVFP4", ignore=IGNORE), dataset="llmc-docs", num_calibration_samples=8,
        max_seq_length=32, moe_calibrate_all_experts=all_experts, pipeline="sequential", precision="bfloat16",
    )
    fake_quant = oneshot(model=str(qwen3_moe), **args)  # the in-memory reference (saving compresses it)
    with caplog.at_level("WARNING", logger="llmc_moe"):
        oneshot(model=str(qwen3_moe), output_dir=str(out), **args)
    tensors = load_checkpoint_tensors(out)
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            assert torch.equal(tensors[f"{prefix}.gate_proj.weight_global_scale"], tensors[f"{prefix}.up_proj.weight_global_scale"])
            for proj in ("gate_proj", "up_proj", "down_proj"):
                scale = tensors[f"{prefix}.{proj}.input_global_scale"].float()
                assert torch.isfinite(scale).all() and (scale > 0).all(), (prefix, proj, scale)
    # the stored experts decompress (compressed-tensors, into the linearized model) to the
    # fake-quantized expert weights. transformers 5.24 reloads NVFP4 experts into its fused
    # ones wrongly (dense layers and W4A16 experts reload exactly): the saved model says so.
    from llmc.evaluation import load_decompressed
    from llmc_moe.stacked import quantized

    assert "NVFP4" in caplog.text and "load_decompressed" in caplog.text
    dense = load_decompressed(out, torch.bfloat16, via_transformers=False)
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                module = getattr(fake_quant.model.layers[layer].mlp.experts[expert], proj)
                stored = getattr(dense.model.layers[layer].mlp.experts[expert], proj).weight
                torch.testing.assert_close(stored, quantized(module, module.weight, "weight").to(stored.dtype))


@pytest.mark.parametrize(("arch", "expert"), [
    ("qwen3_moe", "experts.3.down_proj"), ("mixtral", "experts.3.w2"),
    ("deepseek_v3", "experts.3.down_proj"), ("glm4_moe", "experts.3.down_proj"),
])
def test_tiny_builds_the_moe_families_the_testing_fixture_names(checkpoint_factory, tmp_path, arch, expert):
    """llmc.testing's checkpoint_factory names MoE families ("qwen3_moe", "mixtral", ...):
    llmc.tiny builds them (fused experts, four of them), and the experts are quantized and
    saved under their checkpoint names."""
    path = checkpoint_factory(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.model.layers[-1].mlp.experts.gate_up_proj.shape[0] == 4
    run(path, tmp_path / "out", quant_recipe("W4A16", ignore=IGNORE))
    assert any(k.endswith(f"{expert}.weight_packed") for k in keys(tmp_path / "out"))


def test_a_vector_or_an_embedding_table_held_in_many_dimensions_is_not_taken_for_fused_weights():
    """Kimi Linear's forget gate keeps A_log as 1 × 1 × heads × 1 (a vector), Gemma 4's vision
    patch embedder a 2 × positions × width table of embeddings: neither is a stack of weight
    matrices, so nothing is refused for them; a 3-D stack of matrices still is."""
    from llmc.fused_weights import unquantized_fused_weights
    from llmc.modifiers import QuantizationModifier

    gate = torch.nn.Module()
    gate.A_log = torch.nn.Parameter(torch.zeros(1, 1, 32, 1))
    patches = torch.nn.Module()
    patches.position_embedding_table = torch.nn.Parameter(torch.zeros(2, 64, 16))
    experts = torch.nn.Module()
    experts.down_proj = torch.nn.Parameter(torch.zeros(4, 16, 8))
    model = torch.nn.ModuleDict({"forget_gate": gate, "patch_embedder": patches, "experts": experts})
    left = unquantized_fused_weights(model, [QuantizationModifier(targets="Linear", scheme="W4A16")])
    assert [name for name, _, _ in left] == ["experts"]


NEWER_FAMILIES = ["qwen3_next", "qwen3_5_moe", "minimax_m2", "cohere2_moe", "glm_moe_dsa"]


@pytest.mark.parametrize("arch", NEWER_FAMILIES)
def test_newer_moe_families_quantize_every_expert_and_reload(arch, tmp_path, sample_ids):
    """MoE families transformers 5.2x added (Qwen3-Next, Qwen3.5-MoE, MiniMax-M2, Cohere2-MoE,
    GLM-5's DSA): linearized by the same mechanism, every routed expert quantized (GPTQ on the
    sequential pipeline, which carries GLM-5's indexer picks from layer to layer), and
    transformers reloads the checkpoint with the model's logits."""
    if not hasattr(transformers, tiny.ARCHITECTURES[arch][0]):
        pytest.skip(f"this transformers has no {arch}")
    path = tiny.save_tiny(tmp_path / "model", arch=arch, seed=0)
    config = tiny.build_config(arch)
    recipe = {"s": {"q_modifiers": {"GPTQModifier": {
        "targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"],
    }}}}
    out = tmp_path / "out"
    model = oneshot(model=str(path), recipe=recipe, output_dir=str(out), pipeline="sequential",
                    dataset="llmc-docs", num_calibration_samples=8, max_seq_length=32)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or config.n_routed_experts
    moe_layers = config.num_hidden_layers - getattr(config, "first_k_dense_replace", 0)
    packed = [k for k in keys(out) if re.search(r"\.experts\.\d+\.\w+\.weight_packed$", k)]
    assert len(packed) == moe_layers * experts * 3, sorted(packed)[:6]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-4, rtol=1e-4)


def test_glm5_on_the_sequential_pipeline_quantizes_as_the_basic_one(tmp_path):
    """GLM-5's layers hand each other their indexer's top-k picks (its shared-indexer layers
    attend with them): the sequential pipeline carries them from layer to layer, batch by batch,
    and GPTQ (on the unquantized model's activations, as the basic pipeline has them) writes
    the basic pipeline's checkpoint."""
    if not hasattr(transformers, "GlmMoeDsaConfig"):
        pytest.skip("this transformers has no GLM-5")
    path = tiny.save_tiny(tmp_path / "model", arch="glm_moe_dsa", seed=0, num_hidden_layers=3,
                          indexer_types=["full", "shared", "shared"], index_topk=4)
    recipe = {"s": {"q_modifiers": {"GPTQModifier": {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head", "re:.*mlp.gate$"]}}}}
    for pipeline in ("basic", "sequential"):
        oneshot(model=str(path), recipe=recipe, pipeline=pipeline, quantization_aware_calibration=False,
                output_dir=str(tmp_path / pipeline), dataset="llmc-docs", num_calibration_samples=4, max_seq_length=32)
    basic, sequential = load_checkpoint_tensors(tmp_path / "basic"), load_checkpoint_tensors(tmp_path / "sequential")
    assert basic.keys() == sequential.keys()
    for name, tensor in basic.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(sequential[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert (sequential[name] != tensor).float().mean() < 0.001, name  # a rounding tie may flip


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe", "minimax_m2", "cohere2_moe"])
def test_newer_families_smooth_with_their_default_mappings(arch, tmp_path, sample_ids):
    """SmoothQuant's default mappings for the newer families keep the model's function (the
    norms' scales move into every Linear they feed: q/k/v or linear attention's inputs, every
    expert's gate/up, shared experts, the router; Cohere2's one norm feeds attention and experts),
    and AWQ runs with its own."""
    if not hasattr(transformers, tiny.ARCHITECTURES[arch][0]):
        pytest.skip(f"this transformers has no {arch}")
    path = tiny.save_tiny(tmp_path / "model", arch=arch, seed=0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    data = dict(dataset="llmc-docs", num_calibration_samples=8, max_seq_length=32)
    smoothed = oneshot(model=str(path), recipe={"s": {"smooth_modifiers": {"SmoothQuantModifier": {"smoothing_strength": 0.8}}}}, **data)
    norm = smoothed.model.layers[1].input_layernorm.weight
    assert not torch.allclose(norm, reference.model.layers[1].input_layernorm.weight)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(sample_ids).logits, reference(sample_ids).logits, atol=2e-4, rtol=2e-4)
    awq = {"s": {"q_modifiers": {"AWQModifier": {"scheme": "W4A16_ASYM", "targets": ["Linear"], "ignore": [*IGNORE, "re:.*shared_expert_gate$"]}}}}
    oneshot(model=str(path), recipe=awq, **data)


@pytest.mark.parametrize("recipe", ["SmoothQuantModifier", "AWQModifier"])
def test_qwen3_vl_moe_takes_qwen3_moe_mappings_inside_its_language_model(recipe, tmp_path, sample_ids):
    """Qwen3-VL-MoE's language model has no causal LM class of its own: it takes Qwen3-MoE's
    mappings (the router balanced with the experts, so routing is kept), resolved in the language
    model; the vision tower, which text calibration never runs, is left as it was."""
    if not hasattr(transformers, "Qwen3VLMoeConfig"):
        pytest.skip("this transformers has no Qwen3-VL-MoE")
    model = tiny.build_vision_language("qwen3_vl_moe")
    reference = {name: p.clone() for name, p in model.state_dict().items()}
    before = logits(model, sample_ids)
    tiny.build_tokenizer(2048).save_pretrained(tmp_path)
    modifier = {"SmoothQuantModifier": {"smoothing_strength": 0.8}} if recipe == "SmoothQuantModifier" else {
        "AWQModifier": {"scheme": "W4A16", "ignore": ["lm_head", "re:.*visual.*", "re:.*mlp.gate$"], "apply_clip": False}}
    oneshot(model=model, tokenizer=str(tmp_path), recipe={"s": {"s_modifiers": modifier}}, dataset="llmc-docs",
            num_calibration_samples=8, max_seq_length=32)
    state = model.state_dict()
    norm = "model.language_model.layers.0.post_attention_layernorm.weight"
    assert not torch.equal(state[norm], reference[norm])
    tower = [name for name in reference if name.startswith("model.visual.")]
    assert tower and all(torch.equal(state[name], reference[name]) for name in tower)
    if recipe == "SmoothQuantModifier":  # smoothing alone keeps the function
        torch.testing.assert_close(logits(model, sample_ids), before, atol=2e-4, rtol=2e-4)


def test_recipes_name_experts_projections_as_llm_compressor_does(checkpoint_factory, tmp_path):
    """Mixtral's linearized experts are named as its checkpoint (w1/w3/w2), so the saved keys are
    the checkpoint's; llm-compressor 0.14's recipes call them gate_proj/up_proj/down_proj, and
    targets, ignore and mappings select them under those names too. The saved config keeps the
    recipe's patterns."""
    recipe = {"s": {"q_modifiers": {"QuantizationModifier": {
        "config_groups": {"experts": {"targets": [r"re:.*experts\..*(gate|up)_proj$"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}},
        "ignore": ["lm_head", "re:.*experts.1.up_proj$"],
    }}}}
    out = tmp_path / "out"
    run(checkpoint_factory("mixtral"), out, recipe)
    packed = {k for k in keys(out) if k.endswith("weight_packed")}
    layer = "model.layers.0.block_sparse_moe.experts"
    assert {f"{layer}.0.w1.weight_packed", f"{layer}.0.w3.weight_packed", f"{layer}.1.w1.weight_packed"} <= packed
    assert f"{layer}.1.w3.weight_packed" not in packed  # ignored as up_proj
    assert not any(".w2." in k for k in packed)  # down_proj: not targeted
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["targets"] for g in config["config_groups"].values()] == [[r"re:.*experts\..*(gate|up)_proj$"]]

    from llmc_moe import linearize

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_factory("mixtral"))
    linearize(model)
    resolved = resolve_mappings(model, [[["re:.*experts.*down_proj$"], "re:.*experts.*up_proj$"]], "awq")
    assert resolved and resolved[0].smooth_name.endswith("experts.0.w3") and resolved[0].balance_names[0].endswith("experts.0.w2")


def test_a_vision_language_moe_checkpoint_is_built_as_saved(tmp_path, sample_ids):
    """Qwen3-VL-MoE's config is no AutoModelForCausalLM's: model_free_ptq splits its fused
    experts from the class its config names (they were left fused and unquantized), writing
    oneshot's checkpoint, and load_decompressed rebuilds that class (it failed)."""
    if not hasattr(transformers, "Qwen3VLMoeConfig"):
        pytest.skip("this transformers has no Qwen3-VL-MoE")
    from llmc.evaluation import load_decompressed

    source = tmp_path / "source"
    model = tiny.build_vision_language("qwen3_vl_moe")
    model.save_pretrained(source)
    tiny.build_tokenizer(2048).save_pretrained(source)
    ignore = ["lm_head", "re:.*visual.*", "re:.*mlp.gate$"]
    model_free_ptq(str(source), str(tmp_path / "free"), scheme="W8A16", ignore=ignore)
    oneshot(model=model, tokenizer=str(source), recipe={"s": {"q_modifiers": {"QuantizationModifier": {
        "targets": ["Linear"], "scheme": "W8A16", "ignore": ignore}}}}, output_dir=str(tmp_path / "oneshot"))
    assert_same_tensors(tmp_path / "free", tmp_path / "oneshot")
    assert any(re.search(r"experts\.\d+\.down_proj\.weight_packed$", k) for k in keys(tmp_path / "free"))
    reloaded = load_decompressed(tmp_path / "free", dtype=torch.float32)
    assert type(reloaded).__name__ == "Qwen3VLMoeForConditionalGeneration"
    torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), atol=1e-5, rtol=1e-5)
