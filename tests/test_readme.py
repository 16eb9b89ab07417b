"""Every recipe and scheme the README shows saves a checkpoint that transformers reloads and
generates with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from llmc import model_free_ptq, oneshot

README = (Path(__file__).parents[1] / "README.md").read_text()
RECIPES = re.findall(r"```yaml\n(.*?)```", README, re.S) + re.findall(r"<<'YAML'\n(.*?)YAML\n", README, re.S)
ONESHOT_SCHEMES = re.findall(r'QuantizationModifier\(targets="Linear", scheme="(\w+)"', README)
MODEL_FREE_SCHEMES = re.findall(r'model_free_ptq\([^)]*scheme="(\w+)"', README, re.S) + re.findall(
    r"llmc model-free-ptq .* --scheme (\w+)", README
)


def test_the_readme_shows_what_this_test_runs():
    assert len(RECIPES) >= 4 and ONESHOT_SCHEMES and len(MODEL_FREE_SCHEMES) == 2


def _reloads_and_generates(path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: "+".join(re.findall(r"(\w+)Modifier", r)) + "-" + "+".join(re.findall(r"scheme: (\w+)", r)))
def test_every_readme_recipe_reloads_and_generates(recipe, llama_path, tmp_path):
    out = tmp_path / "out"
    oneshot(model=str(llama_path), recipe=recipe, dataset="llmc-docs", num_calibration_samples=8,
            max_seq_length=32, output_dir=str(out))
    _reloads_and_generates(out)


@pytest.mark.parametrize("scheme", ONESHOT_SCHEMES)
def test_every_readme_oneshot_scheme_reloads_and_generates(scheme, llama_path, tmp_path):
    from llmc.modifiers import QuantizationModifier

    oneshot(model=str(llama_path), recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]),
            output_dir=str(tmp_path / "out"))
    _reloads_and_generates(tmp_path / "out")


@pytest.mark.parametrize("scheme", MODEL_FREE_SCHEMES)
def test_every_readme_model_free_scheme_reloads_and_generates(scheme, llama_path, tmp_path):
    model_free_ptq(llama_path, tmp_path / "out", scheme=scheme, ignore=["lm_head"])
    _reloads_and_generates(tmp_path / "out")


def test_formats_transformers_cannot_reload_as_saved_are_settled_or_named(llama_path, tmp_path, caplog):
    """FP4 weights decompress to bfloat16: a float32 model's config says bfloat16 so that it
    reloads; an asymmetric pack-quantized checkpoint, which transformers 5 cannot rebuild, is
    named at save time with what does load it."""
    import json
    import logging

    from llmc.evaluation import load_decompressed
    from llmc.modifiers import QuantizationModifier

    assert json.loads((llama_path / "config.json").read_text())["dtype"] == "float32"
    with caplog.at_level(logging.WARNING, logger="llmc.reloading"):
        oneshot(model=str(llama_path), recipe=QuantizationModifier(scheme="NVFP4A16", ignore=["lm_head"]),
                output_dir=str(tmp_path / "fp4"))
        assert "config.json's dtype is set to bfloat16 (it was float32)" in caplog.text
        assert json.loads((tmp_path / "fp4" / "config.json").read_text())["dtype"] == "bfloat16"
        _reloads_and_generates(tmp_path / "fp4")
        caplog.clear()
        oneshot(model=str(llama_path), recipe=QuantizationModifier(scheme="W4A16_ASYM", ignore=["lm_head"]),
                output_dir=str(tmp_path / "asym"))
    assert "transformers 5 cannot reload it" in caplog.text and "load_decompressed" in caplog.text
    assert torch.isfinite(load_decompressed(tmp_path / "asym")(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
