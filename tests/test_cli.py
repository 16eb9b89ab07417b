"""The llmc command line."""

from __future__ import annotations

import json
import subprocess
import sys

import attrs
import pytest
from transformers import AutoModelForCausalLM

from llmc.args import GROUPS
from llmc.cli import build_parser, main, oneshot_main


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("oneshot", "plugins", "demo"):
        assert command in out


def test_oneshot_help_lists_every_argument(capsys):
    with pytest.raises(SystemExit):
        main(["oneshot", "--help"])
    out = capsys.readouterr().out
    for group in GROUPS:
        for field in attrs.fields(group):
            assert f"--{field.name}" in out, field.name


def test_plugins_lists_core_builtins(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    core = next(line for line in out.splitlines() if line.startswith("core "))
    for name in ("llmc-core", "QuantizationModifier", "datafree", "compressed-tensors", "llmc-docs"):
        assert name in core


def test_oneshot_from_yaml(llama_path, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: W8A16\n      ignore: [lm_head]\n")
    out = tmp_path / "out"
    code = main(["oneshot", "--model", str(llama_path), "--recipe", str(recipe), "--output_dir", str(out),
                 "--save_compressed", "true", "--recipe_args", "q_stage.q_modifiers.QuantizationModifier.scheme=W4A16"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert main(["oneshot", "--model", str(llama_path), "--recipe", str(recipe), "--recipe_args", "unused=1"]) == 2
    AutoModelForCausalLM.from_pretrained(out)


def test_compatible_oneshot_script_and_errors(llama_path, tmp_path, capsys):
    code = oneshot_main(["--model", str(llama_path), "--recipe", "q_modifiers:\n  QuantizationModifier: {scheme: nope}\n"])
    assert code == 2
    assert "Unknown quantization scheme 'nope'" in capsys.readouterr().err


def test_typed_options():
    ns = build_parser().parse_args(["oneshot", "--model", "m", "--num_calibration_samples", "7",
                                    "--pad_to_max_length", "false", "--sequential_targets", "A", "B"])
    assert ns.num_calibration_samples == 7 and ns.pad_to_max_length is False
    assert ns.sequential_targets == ["A", "B"]
    assert not hasattr(ns, "max_seq_length")  # unset options keep oneshot's defaults


def test_console_scripts_are_installed():
    result = subprocess.run([sys.executable, "-m", "pip", "show", "-f", "llmc-core"], capture_output=True, text=True)
    assert result.returncode == 0
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["llmc"] == "llmc.cli:main" and scripts["oneshot"] == "llmc.cli:oneshot_main"


def test_oneshot_shows_its_real_arguments_and_the_stub_is_current():
    """help(), IDEs and type checkers see oneshot's keyword arguments: the runtime signature
    and the written stub both come from the argument classes."""
    import inspect
    from pathlib import Path

    import llmc
    from llmc.args import all_field_names, stub

    params = inspect.signature(llmc.oneshot).parameters
    assert list(params) == all_field_names()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["num_calibration_samples"].default == 512 and params["model"].default is inspect.Parameter.empty
    assert "max_seq_length: Tokens per sample" in llmc.oneshot.__doc__
    written = Path(llmc.__file__).with_suffix(".pyi").read_text()
    assert written == stub(), "regenerate it: python -m llmc.args > packages/core/src/llmc/__init__.pyi"
    with pytest.raises(TypeError, match=r"oneshot\(\) is missing the required argument model \(Hugging Face"):
        llmc.oneshot(recipe="unused")
