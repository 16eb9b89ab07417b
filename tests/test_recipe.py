"""Recipes: llm-compressor's YAML shape, objects, overrides, stages, serialisation."""

from __future__ import annotations

import pytest

from llmc.modifiers.quantization import QuantizationModifier
from llmc.recipe import Recipe, RecipeError

YAML = """
first_stage:
  quant_modifiers:
    QuantizationModifier:
      targets: ["Linear"]
      scheme: W8A16
      ignore: ["lm_head"]
second_stage:
  run_type: oneshot
  quant_modifiers:
    QuantizationModifier:
      scheme: W4A16
"""


def test_yaml_stages_and_groups():
    recipe = Recipe.load(YAML)
    assert [s.name for s in recipe.stages] == ["first_stage", "second_stage"]
    first = recipe.stages[0].modifiers[0]
    assert isinstance(first, QuantizationModifier)
    assert first.scheme == "W8A16" and first.ignore == ["lm_head"]


def test_yaml_file_and_stage_selection(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(YAML)
    recipe = Recipe.load(str(path), stage="second_stage")
    assert [s.name for s in recipe.stages] == ["second_stage"]
    with pytest.raises(RecipeError, match="no stage 'third'.*first_stage, second_stage"):
        Recipe.load(str(path), stage="third")


def test_groups_without_stage_and_list_form():
    recipe = Recipe.load("quant_modifiers:\n  - QuantizationModifier: {scheme: W4A16}\n  - QuantizationModifier: {scheme: W8A16}\n")
    assert [m.scheme for m in recipe.modifiers] == ["W4A16", "W8A16"]
    again = Recipe.load(recipe.to_yaml())
    assert [m.scheme for m in again.modifiers] == ["W4A16", "W8A16"]


def test_top_level_groups_run_before_the_named_stages_wherever_written():
    text = ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: W8A16}\n"
            "first_modifiers:\n  QuantizationModifier: {scheme: W4A16}\n")
    recipe = Recipe.load(text)
    assert [s.name for s in recipe.stages] == ["default_stage", "quant_stage"]
    assert [m.scheme for m in recipe.modifiers] == ["W4A16", "W8A16"]


def test_modifier_objects():
    mod = QuantizationModifier(scheme="W4A16")
    assert Recipe.load(mod).modifiers == [mod]
    assert Recipe.load([mod, mod]).modifiers == [mod, mod]


def test_recipe_args_override_variables_and_paths():
    text = "args:\n  bits_scheme: W4A16\nq_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: eval(bits_scheme)\n"
    assert Recipe.load(text).modifiers[0].scheme == "W4A16"
    assert Recipe.load(text, recipe_args=["bits_scheme=W8A16"]).modifiers[0].scheme == "W8A16"
    path = "q_stage.q_modifiers.QuantizationModifier.ignore=[lm_head, 're:.*gate.*']"
    assert Recipe.load(text, recipe_args=[path]).modifiers[0].ignore == ["lm_head", "re:.*gate.*"]
    with pytest.raises(RecipeError, match="names no value"):
        Recipe.load(text, recipe_args=["q_stage.nothing.here=1"])
    with pytest.raises(RecipeError, match="key=value"):
        Recipe.load(text, recipe_args=["novalue"])
    with pytest.raises(RecipeError, match="'foo' is no variable of the recipe \\(its variables: bits_scheme\\)"):
        Recipe.load(text, recipe_args=["foo=1"])  # it was accepted, and changed nothing
    undeclared = "q_modifiers:\n  QuantizationModifier:\n    scheme: eval(bits)\n"
    assert Recipe.load(undeclared, recipe_args=["bits=W8A16"]).modifiers[0].scheme == "W8A16"
    with pytest.raises(RecipeError, match="references 'missing'"):
        Recipe.load("q_modifiers:\n  QuantizationModifier:\n    scheme: eval(missing)\n")


def test_round_trip_preserves_everything():
    recipe = Recipe.load(YAML)
    again = Recipe.load(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()
    assert [s.name for s in again.stages] == ["first_stage", "second_stage"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [unclosed", "Malformed recipe YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("q_modifiers:\n  NopeModifier: {}\n", "Unknown modifier 'NopeModifier'"),
        ("q_modifiers:\n  QuantizationModifier: {scheme: W3A3}\n", "Unknown quantization scheme 'W3A3'"),
        ("q_modifiers:\n  QuantizationModifier: {schem: W4A16}\n", "no argument 'schem'. Did you mean 'scheme'"),
        ("q_modifiers:\n  QuantizationModifier: {}\n", "No quantization described"),
        ("stage:\n  bogus: 1\n", "holds '\\*_modifiers' groups"),
        ("missing_recipe.yaml", "Recipe file not found"),
    ],
)
def test_bad_recipes_are_explained(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load(text)


def test_no_recipe_runs_the_pipeline_and_quantizes_nothing(llama_path, tmp_path, caplog):
    """``recipe=None``, as llm-compressor's prefetch benchmark example passes it: the pipeline's
    forward passes run, nothing is quantized (said), and the saved weights are the model's."""
    from llmc import oneshot
    from llmc.testing import assert_same_tensors

    with caplog.at_level("WARNING", logger="llmc.recipe"):
        oneshot(model=str(llama_path), recipe=None, pipeline="sequential", dataset="llmc-docs",
                num_calibration_samples=4, max_seq_length=32, output_dir=str(tmp_path / "out"))
    assert "nothing will be quantized" in caplog.text
    assert (tmp_path / "out" / "recipe.yaml").read_text().strip().endswith("default_stage: {}")
    assert_same_tensors(tmp_path / "out", llama_path)
    with pytest.raises(RecipeError, match="recipe_args were given without a recipe"):
        Recipe.load(None, recipe_args={"scheme": "W4A16"})
