"""SpinQuant on MoE models: Cohere2-MoE prepared as llm-compressor 0.14's example prepares it
(llmc.modeling), and routers R1 cannot reach refused before anything changes."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmc import oneshot, tiny

pytestmark = pytest.mark.skipif(not hasattr(transformers, "Cohere2MoeConfig"), reason="transformers without Cohere2-MoE")


@pytest.fixture(scope="module")
def cohere2_moe(tmp_path_factory):
    """A tiny Cohere2-MoE that normalizes by RMS (as North-Mini does), a dense first layer."""
    path = tmp_path_factory.mktemp("cohere2-moe")
    tiny.save_tiny(path, arch="cohere2_moe", hidden_size=128, intermediate_size=256, rms_norm_eps=1e-5,
                   first_k_dense_replace=1, num_hidden_layers=3)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_prepared_cohere2_moe_rotates_and_quantizes_with_its_function_kept(cohere2_moe, sample_ids, tmp_path):
    from llmc.modeling.moe.cohere2_moe import LinearRouter, prepare_cohere2_moe_for_spinquant
    from llmc.modifiers import QuantizationModifier, SpinQuantModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(cohere2_moe, dtype=torch.float32)
    reference = _logits(model, sample_ids)
    prepare_cohere2_moe_for_spinquant(model)
    routers = [layer.mlp.gate for layer in model.model.layers[1:]]
    assert routers and all(isinstance(r, LinearRouter) for r in routers)
    assert all(bool((layer.input_layernorm.weight == 1).all()) for layer in model.model.layers)
    torch.testing.assert_close(_logits(model, sample_ids), reference, atol=1e-5, rtol=1e-5)

    oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R1", "R2", "R4"])], pipeline="datafree")
    assert not torch.allclose(routers[0].linear.weight, transformers.AutoModelForCausalLM.from_pretrained(
        cohere2_moe).model.layers[1].mlp.gate.weight)  # rotated with the residual stream
    torch.testing.assert_close(_logits(model, sample_ids), reference, atol=1e-4, rtol=1e-4)

    recipe = QuantizationModifier(targets="Linear", scheme="W4A16",
                                  ignore=["lm_head", r"re:.*mlp\.gate\.linear$"])
    oneshot(model=model, recipe=recipe, pipeline="datafree", output_dir=str(tmp_path / "out"))
    config = (tmp_path / "out" / "config.json").read_text()
    assert '"R1"' in config and '"R4"' in config


@pytest.mark.parametrize("arch", ["cohere2_moe", "qwen3_moe"])
def test_r1_is_refused_where_a_router_reads_the_residual_stream_with_its_own_matrix(arch, checkpoint_factory):
    """Unprepared, Cohere2-MoE's router (like Qwen3-MoE's) holds a weight matrix, not a Linear:
    R1 would leave it reading unrotated weights and route tokens elsewhere."""
    from llmc.modifiers import SpinQuantModifier

    with pytest.raises(ValueError, match=r"layers\.\d+\.mlp\.gate .*prepare_cohere2_moe_for_spinquant"):
        oneshot(model=str(checkpoint_factory(arch)), recipe=[SpinQuantModifier(rotations=["R1", "R2"])],
                pipeline="datafree")


def test_a_missing_provider_is_an_import_error_naming_the_distribution():
    from llmc.modeling.moe import provided

    with pytest.raises(ImportError, match="comes with llmc-moe: pip install llmc-moe"):
        provided("llmc_moe.no_such_module", "prepare_something")


def test_fuse_norm_linears_keeps_the_function():
    from llmc.modeling import fuse_norm_linears

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(16)
    torch.nn.init.uniform_(norm.weight, 0.5, 2.0)
    linears = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)]
    x = torch.randn(3, 16)
    before = [linear(norm(x)) for linear in linears]
    fuse_norm_linears(norm, linears)
    assert bool((norm.weight == 1).all())
    for linear, expected in zip(linears, before, strict=True):
        torch.testing.assert_close(linear(norm(x)), expected)
