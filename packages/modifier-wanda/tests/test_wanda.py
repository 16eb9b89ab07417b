"""Wanda's rule against a row-by-row reference, and WandaPruningModifier through oneshot."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmc import oneshot
from llmc.testing import load_checkpoint_tensors
from llmc_wanda.prune import wanda_prune

DATA = dict(dataset="llmc-docs", num_calibration_samples=16, max_seq_length=64)


def _problem(rows=32, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.randn(cols, generator=g).exp()  # uneven input channels
    return torch.randn(rows, cols, generator=g), x


def reference(w, x, sparsity, n, m):
    """Row by row: the weights whose |w| ‖x_j‖ rank lowest in the row (or in each group of m)."""
    norms = x.pow(2).sum(0).sqrt()
    out = w.clone()
    for r in range(w.shape[0]):
        score = w[r].abs() * norms
        if n:
            for g in range(0, w.shape[1], m):
                out[r, g + score[g : g + m].argsort()[:n]] = 0
        else:
            out[r, score.argsort()[: int(w.shape[1] * sparsity)]] = 0
    return out


@pytest.mark.parametrize("sparsity, n, m", [(0.5, 0, 0), (0.7, 0, 0), (0.5, 2, 4), (0.25, 1, 4)])
def test_matches_the_row_by_row_reference(sparsity, n, m):
    w, x = _problem()
    torch.testing.assert_close(wanda_prune(w, x.pow(2).sum(0), sparsity, n, m), reference(w, x, sparsity, n, m))


def test_input_norms_make_it_better_than_magnitude():
    w, x = _problem(rows=64, cols=128)
    wanda = wanda_prune(w, x.pow(2).sum(0), 0.5, 2, 4)
    magnitude = wanda_prune(w, torch.ones(128), 0.5, 2, 4)  # equal norms: plain magnitude
    error = lambda p: float(((x @ (w - p).T) ** 2).sum())  # noqa: E731
    assert error(wanda) < 0.8 * error(magnitude)


def test_layer_zero_equals_the_rule_on_a_plain_forwards_inputs(llama_path, tmp_path):
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.modifiers.pruning import WandaPruningModifier
    from llmc.tiny import build_tokenizer

    original = AutoModelForCausalLM.from_pretrained(llama_path)
    inputs: list[torch.Tensor] = []
    layer = original.model.layers[0]
    layer.mlp.down_proj.register_forward_pre_hook(lambda mod, a: inputs.append(a[0]))
    with torch.no_grad():
        for batch in build_calibration_dataloader(DatasetArguments(**DATA), build_tokenizer(2048)):
            original(**batch)
    out = tmp_path / "out"
    modifier = WandaPruningModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])
    oneshot(model=str(llama_path), recipe=[modifier], output_dir=str(out), **DATA)
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).float()
    expected = wanda_prune(layer.mlp.down_proj.weight.detach(), x.pow(2).sum(0), 0.5, 2, 4)
    got = load_checkpoint_tensors(out)["model.layers.0.mlp.down_proj.weight"]
    assert float(((got == 0) == (expected == 0)).float().mean()) > 0.999
    for name, weight in load_checkpoint_tensors(out).items():
        if name.endswith("proj.weight"):
            assert bool(((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) >= 2).all()), name


def test_unstructured_per_target_sparsity_and_refusals(llama_path):
    from llmc.modifiers import WandaPruningModifier

    model = oneshot(model=str(llama_path), recipe=[WandaPruningModifier(sparsity=[0.3, 0.6], targets=[r"re:model.layers.\d+$"])], **DATA)
    for index, target in enumerate([0.3, 0.6]):
        weight = model.model.layers[index].mlp.up_proj.weight
        assert float((weight == 0).float().mean()) == pytest.approx(target, abs=0.01)
    with pytest.raises(ValueError, match="needs sparsity"):
        WandaPruningModifier()
    with pytest.raises(ValueError, match="one value per matched module"):
        oneshot(model=str(llama_path), recipe=[WandaPruningModifier(sparsity=[0.5], targets=[r"re:model.layers.\d+$"])], **DATA)
