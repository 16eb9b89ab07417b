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


LOGGED_RUN = """
import logging, sys
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.INFO)
from llmc import oneshot
oneshot(model=sys.argv[1], recipe="q_modifiers:\\n  QuantizationModifier: {scheme: W4A16, ignore: [lm_head]}\\n",
        output_dir=sys.argv[3])
"""


@pytest.mark.parametrize("application", ["configured", "silent"])
def test_each_log_line_prints_once_whoever_configures_logging(application, llama_path, tmp_path):
    """With logging.basicConfig in the script, llmc's records go to its handlers only; with
    nothing configured, llmc's own console handler shows them. Either way, once."""
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", LOGGED_RUN, str(llama_path), application, str(out)],
                          capture_output=True, text=True, check=True)
    saved = [line for line in proc.stderr.splitlines() if "Saved to" in line]
    assert len(saved) == 1 and str(out) in saved[0], proc.stderr[-2000:]
    assert ".tmp-" not in saved[0]  # the final path, not the temporary one


INTERRUPTED = """
import os, signal, sys, time
from pathlib import Path
from llmc.cli import main
from llmc.hookspecs import hookimpl
from llmc.plugins import get_plugin_manager
class Stop:
    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer):
        if layer_name.endswith(".1"):
            Path(sys.argv[3]).write_text("calibrating")
            time.sleep(60)
get_plugin_manager().register(Stop(), name="stop")
sys.exit(main(["oneshot", "--model", sys.argv[1], "--recipe", sys.argv[4], "--output_dir", sys.argv[2],
               "--dataset", "llmc-docs", "--num_calibration_samples", "4", "--max_seq_length", "32",
               "--resume_interval", "0"]))
"""


def test_ctrl_c_says_in_one_line_what_is_on_disk_and_exits_130(llama_path, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("q_modifiers:\n  GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}\n")
    marker, out = tmp_path / "marker", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(llama_path), str(out), str(marker), str(recipe)],
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if marker.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llmc oneshot: interrupted;") and ".out.llmc-resume" in last, err[-2000:]
    assert not out.exists()


def test_output_directories_honour_the_umask(llama_path, tmp_path):
    import os
    import stat

    from llmc import oneshot

    previous = os.umask(0o027)
    try:
        oneshot(model=str(llama_path), recipe="q_modifiers:\n  QuantizationModifier: {scheme: W4A16}\n",
                output_dir=str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_the_cli_log_level_hides_info(llama_path, tmp_path, capsys):
    import logging

    code = main(["--log-level", "WARNING", "oneshot", "--model", str(llama_path), "--recipe",
                 "q_modifiers:\n  QuantizationModifier: {scheme: W4A16, ignore: [lm_head]}\n",
                 "--output_dir", str(tmp_path / "out")])
    assert code == 0 and logging.getLogger("llmc").level == logging.WARNING
    assert "Saved to" not in capsys.readouterr().err
    assert main(["--log-level", "LOUD", "plugins"]) == 2
    assert "Unknown log level 'LOUD'" in capsys.readouterr().err
