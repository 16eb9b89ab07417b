"""Linearization: every MoE family of transformers keeps its function, under its checkpoint names."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from llmc.args import DatasetArguments
from llmc_moe import FusedLayout, LinearExperts, MoEPatch, linear_experts, linearize

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
)

# family -> config (every MoE family of transformers whose experts are fused)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **SMALL, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=16),
    "qwen3_next": lambda: transformers.Qwen3NextConfig(
        **SMALL, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        layer_types=["full_attention", "full_attention"],
    ),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, num_experts=4),
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, num_local_experts=4, head_dim=8),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **SMALL, n_routed_experts=4, moe_intermediate_size=16, first_k_dense_replace=0
    ),
    "granitemoe": lambda: transformers.GraniteMoeConfig(**SMALL, num_local_experts=4),
    "phimoe": lambda: transformers.PhimoeConfig(**SMALL, num_local_experts=4),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**SMALL, "num_key_value_heads": 4}, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
        first_k_dense_replace=1, n_group=2, topk_group=1,
    ),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **{**SMALL, "num_key_value_heads": 4}, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
        first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1,
    ),
    "llama4": lambda: transformers.Llama4TextConfig(**SMALL, num_local_experts=4, intermediate_size_mlp=64),
}

# family -> (experts module of layer 1, gate, up, down names of one expert's projections)
CHECKPOINT_NAMES = {
    "mixtral": ("model.layers.1.mlp.experts", "w1", "w3", "w2"),
    "phimoe": ("model.layers.1.mlp.experts", "w1", "w3", "w2"),
    "granitemoe": ("model.layers.1.block_sparse_moe.experts", "gate_proj", "up_proj", "down_proj"),
    "llama4": ("model.layers.1.feed_forward.experts", "gate_proj", "up_proj", "down_proj"),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    for p in model.parameters():  # transformers leaves some fused experts at zero
        if p.ndim == 3:
            p.data.normal_(0, 0.2)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_linearized_model_has_the_fused_models_logits(family, ids):
    model = build(family)
    fused = {name: (type(m).__name__, FusedLayout.of(m)) for name, m in model.named_modules() if FusedLayout.of(m)}
    assert fused, "the tiny config holds no fused experts"
    reference = logits(model, ids)

    assert sorted(linearize(model)) == sorted(fused)
    assert not [n for n, p in model.named_parameters() if p.ndim >= 3]
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)

    # every token through every expert: the output stays the routed combination
    for _, module in linear_experts(model):
        module.all_experts = True
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)

    name, gate, up, down = CHECKPOINT_NAMES.get(family, (None, "gate_proj", "up_proj", "down_proj"))
    experts_name = name or next(n for n in fused if ".1." in n or n.endswith("layers.1.mlp.experts"))
    expert = model.get_submodule(f"{experts_name}.3")
    assert {n for n, _ in expert.named_children()} == {gate, up, down}
    assert all(isinstance(m, torch.nn.Linear) for m in expert.children())


def test_expert_weights_are_the_fused_slices():
    """gpt-oss: input-major, gate and up interleaved, biases; each Linear gets its exact slice."""
    model = build("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    gate_up, gate_up_bias = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    down = fused.down_proj.detach().clone()
    linearize(model)
    expert = model.model.layers[0].mlp.experts[2]
    assert torch.equal(expert.gate_proj.weight, gate_up[2][:, 0::2].t())
    assert torch.equal(expert.up_proj.weight, gate_up[2][:, 1::2].t())
    assert torch.equal(expert.up_proj.bias, gate_up_bias[2][1::2])
    assert torch.equal(expert.down_proj.weight, down[2].t())
    assert expert.gate_proj.weight.is_contiguous()


def test_all_experts_context_counts_tokens_and_warns(ids, caplog):
    model = build("qwen3_moe")
    patch = MoEPatch()
    assert patch.matches(model)
    patch.apply(model)
    assert patch.matches(model)  # still itself once linearized: its context must be entered
    modules = linear_experts(model)
    tokens = ids.numel()

    with patch.calibration_context(model, DatasetArguments(moe_calibrate_all_experts=True, min_tokens_per_module=0.5)):
        assert all(m.all_experts for _, m in modules)
        logits(model, ids)
    assert not any(m.all_experts for _, m in modules)
    for _, module in modules:
        assert module.tokens_total == tokens
        assert module.tokens_seen == [tokens] * module.num_experts

    caplog.set_level(logging.WARNING, logger="llmc_moe")
    args = DatasetArguments(moe_calibrate_all_experts=False, min_tokens_per_module=0.6)
    with patch.calibration_context(model, args):
        logits(model, ids)
    for _, module in modules:
        assert sum(module.tokens_seen) == tokens * 2  # two experts per token
    starved = [f"{n}.{e}" for n, m in modules for e, seen in enumerate(m.tokens_seen) if seen < 0.6 * tokens]
    assert starved, "with 4 experts and top-2 routing some expert must see under 60 % of tokens"
    message = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"{name} (" in message for name in starved)
    assert "min_tokens_per_module" in message


def test_routed_only_experts_see_only_their_tokens(ids):
    model = build("qwen3_moe")
    linearize(model)
    experts: LinearExperts = model.model.layers[0].mlp.experts
    seen: dict[int, int] = {}
    handles = [
        e.gate_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, seen.get(i, 0) + a[0].shape[0]))
        for i, e in enumerate(experts)
    ]
    logits(model, ids)
    assert sum(seen.values()) == ids.numel() * 2
    experts.all_experts = True
    seen.clear()
    logits(model, ids)
    assert seen == dict.fromkeys(range(4), ids.numel())
    for h in handles:
        h.remove()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "qwen2_moe"])
def test_stacked_experts_call_every_hook_with_what_each_expert_sees(family, ids, monkeypatch):
    """All experts on all tokens computed together: same logits, and every Linear's hooks get
    the inputs and outputs that calling the experts one by one gives them."""
    from llmc_moe import stacked as stacking

    model = build(family)
    linearize(model)
    for _, module in linear_experts(model):
        module.all_experts = True

    def run() -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        seen: dict[str, list[torch.Tensor]] = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".experts." in name:
                handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: seen.setdefault(n, []).append(a[0].clone())))
                handles.append(m.register_forward_hook(lambda mod, a, o, n=name: seen.setdefault(n + ":out", []).append(o.clone())))
        try:
            return logits(model, ids), seen
        finally:
            for h in handles:
                h.remove()

    stacked_logits, stacked = run()
    monkeypatch.setattr(stacking, "stackable", lambda module: False)
    each_logits, each = run()
    torch.testing.assert_close(stacked_logits, each_logits, rtol=1e-5, atol=1e-5)
    assert stacked.keys() == each.keys() and stacked
    for key in each:
        for a, b in zip(stacked[key], each[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["NVFP4", "W8A8", "FP8", "FP8_DYNAMIC"])
def test_stacked_experts_fake_quantize_as_each_expert_does(scheme, ids, monkeypatch):
    """With compressed-tensors' quantized forward on every expert projection (weights, static
    or dynamic inputs) and observers writing scales batch after batch, the stacked path gives
    the logits and the scales that calling each expert gives."""
    from compressed_tensors.quantization import apply_quantization_config

    from llmc.quantization.calibrate import (
        ActivationObservers,
        calibrate_weights,
        initialized_modules,
    )
    from llmc.quantization.config import build_config, resolve_config_groups
    from llmc_moe import stacked as stacking

    def quantized_model() -> tuple[torch.nn.Module, ActivationObservers]:
        model = build("qwen3_moe")
        linearize(model)
        config = build_config(resolve_config_groups(scheme, None, ["Linear"]), ["lm_head", "re:.*mlp.gate$"])
        apply_quantization_config(model, config)
        modules = initialized_modules(model)
        calibrate_weights(modules)
        observers = ActivationObservers()
        for name, module in modules:
            observers.attach(module, name=name)
        for _, module in linear_experts(model):
            module.all_experts = True
        return model, observers

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        model, observers = quantized_model()
        outputs = [logits(model, ids), logits(model, ids.flip(0))]  # scales change between batches
        observers.detach()
        scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("input_scale", "input_global_scale"))}
        return outputs, scales

    stacked_outputs, stacked_scales = run()
    monkeypatch.setattr(stacking, "stackable", lambda module: False)
    each_outputs, each_scales = run()
    for a, b in zip(stacked_outputs, each_outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert stacked_scales.keys() == each_scales.keys()
    for name in each_scales:
        torch.testing.assert_close(stacked_scales[name], each_scales[name], rtol=1e-5, atol=1e-6)


def test_one_layers_stacked_weights_at_a_time(ids):
    """The basic pipeline runs every layer per batch: the model's one store keeps only the
    running layer's stacked weights, and an edited weight is stacked again."""
    model = build("qwen3_moe")
    linearize(model)
    layers = [m for _, m in linear_experts(model)]
    assert layers[0]._stacks is layers[1]._stacks
    store = layers[0]._stacks
    for module in layers:
        module.all_experts = True
    logits(model, ids)
    assert store._owner == id(layers[1]) and store._stacks  # layer 0's were evicted
    before = {k: v[1] for k, v in store._stacks.items()}
    with torch.no_grad():
        layers[1][0].down_proj.weight.mul_(2)
    reference = logits(model, ids)
    assert not torch.equal(store._stacks[(0, "down")][1], before[(0, "down")])
    for module in layers:
        module.clear_stacks()
    torch.testing.assert_close(logits(model, ids), reference)


def test_input_quantization_is_shared_only_when_scales_agree():
    from compressed_tensors.quantization import apply_quantization_config

    from llmc.quantization.config import build_config, resolve_config_groups
    from llmc_moe.stacked import same_input_quantization

    model = build("qwen3_moe")
    linearize(model)
    apply_quantization_config(model, build_config(resolve_config_groups("NVFP4", None, ["Linear"]), ["lm_head"]))
    experts = model.model.layers[0].mlp.experts
    modules = [e.up_proj for e in experts] + [e.gate_proj for e in experts]
    for m in modules:
        m.input_global_scale.data.fill_(3.0)
    assert same_input_quantization(modules)
    modules[5].input_global_scale.data.fill_(2.0)
    assert not same_input_quantization(modules)
