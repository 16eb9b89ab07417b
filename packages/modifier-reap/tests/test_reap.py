"""REAPPruningModifier through oneshot on tiny MoE models: saliency against a direct computation
on the fused model, the cut model against its reloaded checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmc import oneshot, tiny
from llmc.testing import load_checkpoint_tensors
from llmc_reap.modifier import retained_experts

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("qwen3moe") / "m", arch="qwen3_moe", num_experts=8, seed=0)


def _reap(path, tmp_path, recipe_extra=None, **arguments):
    modifiers = {"REAPPruningModifier": arguments, **(recipe_extra or {})}
    out = tmp_path / "out"
    model = oneshot(model=str(path), recipe={"s": {"p_modifiers": modifiers}}, output_dir=str(out), **DATA)
    return model, out


def _reference_saliency(path) -> torch.Tensor:
    """Layer 0's saliency from the unpruned fused model: each calibration token's routing
    weights and its experts' outputs computed from the fused weights."""
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.tiny import build_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    inputs: list[torch.Tensor] = []
    mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in build_calibration_dataloader(DatasetArguments(**DATA), build_tokenizer(2048)):
            model(**batch)
        x = torch.cat(inputs)
        _, weights, indices = mlp.gate(x)
        experts = mlp.experts
        total = torch.zeros(experts.gate_up_proj.shape[0], dtype=torch.float64)
        count = torch.zeros_like(total)
        for e in range(len(total)):
            gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            out = (experts.act_fn(gate) * up) @ experts.down_proj[e].T
            token, slot = (indices == e).nonzero(as_tuple=True)
            total[e] = (weights[token, slot].double() * out[token].norm(dim=-1).double()).sum()
            count[e] = len(token)
    return total / count.clamp(min=1)


@pytest.mark.parametrize("all_experts", [True, False])
def test_saliency_is_the_routed_weight_times_output_norm_and_the_least_salient_go(qwen3_moe, tmp_path, sample_ids, all_experts):
    """Whether every expert runs on every token (the stacked path) or only on its own, the
    saliency counts the routed tokens alone."""
    from llmc.modifiers import REAPPruningModifier

    modifier_report = tmp_path / "report" / "retained.json"
    reap = REAPPruningModifier(sparsity=0.25, report_path=str(modifier_report))
    out = tmp_path / "out"
    model = oneshot(model=str(qwen3_moe), recipe=[reap], output_dir=str(out), moe_calibrate_all_experts=all_experts, **DATA)
    expected = _reference_saliency(qwen3_moe)
    report = json.loads(modifier_report.read_text())
    assert set(report) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    dropped = set(torch.topk(expected, 2, largest=False).indices.tolist())
    assert report["model.layers.0.mlp"] == [e for e in range(8) if e not in dropped]
    # the modifier's own record of layer 0's saliency, against the reference
    torch.testing.assert_close(torch.tensor(reap.saliency["model.layers.0.mlp"], dtype=torch.float64), expected, rtol=1e-4, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 6
    for layer in model.model.layers:
        assert layer.mlp.experts.num_experts == 6 and layer.mlp.gate.weight.shape[0] == 6
    names = load_checkpoint_tensors(out)
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in names
    assert "model.layers.0.mlp.experts.6.down_proj.weight" not in names
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-5, rtol=1e-5)


def test_grouped_routing_drops_as_many_from_each_group(tmp_path, sample_ids):
    """DeepSeek-V3's router picks groups first: each group keeps the same number of experts,
    and the score-correction bias is cut with the router."""
    path = tiny.save_tiny(tmp_path / "ds", arch="deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1, seed=0)
    model, out = _reap(path, tmp_path, sparsity=0.5)
    block = model.model.layers[1].mlp
    assert block.experts.num_experts == 4 and block.gate.e_score_correction_bias.shape == (4,)
    assert block.gate.num_experts == 4
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-5, rtol=1e-5)


def test_retained_experts_by_group():
    saliency = torch.tensor([0.1, 0.05, 0.9, 0.3, 0.2, 0.8, 0.6, 0.7])
    assert retained_experts(saliency, 2, None) == [2, 3, 4, 5, 6, 7]
    assert retained_experts(saliency, 2, 2) == [0, 2, 3, 5, 6, 7]  # one from each group of 4
    assert retained_experts(saliency, 4, 2) == [2, 3, 5, 7]


def test_reap_then_quantization_in_one_recipe(qwen3_moe, tmp_path):
    """llm-compressor's REAP examples prune, then quantize the rest in the same recipe."""
    quantize = {"QuantizationModifier": {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head", "re:.*mlp.gate$"]}}
    _, out = _reap(qwen3_moe, tmp_path, recipe_extra=quantize, sparsity=0.5)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4
    tensors = load_checkpoint_tensors(out)
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in tensors
    assert not any(k.startswith("model.layers.1.mlp.experts.4.") for k in tensors)


def test_mixtral_keeps_its_expert_names(checkpoint_factory, tmp_path, sample_ids):
    model, out = _reap(checkpoint_factory("mixtral"), tmp_path, sparsity=0.25)
    tensors = load_checkpoint_tensors(out)
    # saved under the original checkpoints' names, as vLLM reads them
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in tensors
    assert not any(".experts.3." in k for k in tensors)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample_ids).logits, model(sample_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"sparsity": 0.0}, r"in \(0, 1\)"),
        ({"sparsity": 1.0}, r"in \(0, 1\)"),
        ({"sparsity": 0.1}, "drops no expert"),
        ({"sparsity": 0.9}, "fewer than the 2 it picks"),
        ({"sparsity": 0.25, "report_path": "retained.txt"}, r"\.json"),
    ],
)
def test_bad_arguments_are_refused(qwen3_moe, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        _reap(qwen3_moe, tmp_path, **arguments)


def test_a_dense_model_is_refused(llama_path, tmp_path):
    with pytest.raises(ValueError, match="expert count|no MoE block"):
        _reap(llama_path, tmp_path, sparsity=0.25)
