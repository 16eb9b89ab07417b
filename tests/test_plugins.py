"""Plugin discovery: core through its own entry point, a third party through its own."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmc.plugins import PluginNotFoundError, get_plugin_manager, get_registry

FIXTURE = Path(__file__).parent / "plugin_fixture"


def test_core_builtins_come_from_the_entry_point():
    registry = get_registry()
    by_name = {(e.kind, e.name): e for e in registry.entries}
    for key in [("modifier", "QuantizationModifier"), ("pipeline", "datafree"),
                ("pipeline", "independent"), ("saver", "compressed-tensors"), ("dataset", "llmc-docs")]:
        assert by_name[key].distribution == "llmc-core", key
        assert by_name[key].plugin == "core"
    assert by_name[("pipeline", "basic")].distribution == "llmc-pipelines"


def test_missing_modifier_names_the_package(fancy_provider):
    with pytest.raises(ImportError, match="pip install llmc-fancy"):
        from llmc.modifiers import FancyModifier  # noqa: F401


def test_unknown_names_list_what_is_installed():
    registry = get_registry()
    with pytest.raises(PluginNotFoundError, match="Installed pipelines: .*basic.*datafree"):
        registry.get("pipeline", "turbo")
    with pytest.raises(PluginNotFoundError, match="Did you mean 'QuantizationModifier'"):
        registry.get("modifier", "QuantisationModifier")


def test_modifier_import_resolves_through_registry():
    from llmc.modifiers import QuantizationModifier
    from llmc.modifiers.quantization import QuantizationModifier as direct

    assert QuantizationModifier is direct


def test_duplicate_registration_is_an_error():
    from llmc.hookspecs import hookimpl
    from llmc.modifiers.quantization import QuantizationModifier

    class Clash:
        @hookimpl
        def llmc_register_modifiers(self, register):
            register(QuantizationModifier)

    pm = get_plugin_manager()
    plugin = Clash()
    pm.register(plugin, name="clash")
    try:
        with pytest.raises(ValueError, match="registered twice"):
            get_registry()
    finally:
        pm.unregister(plugin)
    assert get_registry().has("modifier", "QuantizationModifier")


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """Install the throwaway plugin package into a private target directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(FIXTURE)],
        check=True,
    )
    return target


def _run(code: str, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


def test_third_party_plugin_is_listed(installed_plugin):
    result = _run("from llmc.cli import main; main(['plugins'])", installed_plugin)
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("scaleplugin"))
    assert "llmc-scaleplugin" in line and "0.0.1" in line and "ScaleWeightsModifier" in line


def test_third_party_modifier_runs_from_yaml(installed_plugin, llama_path, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        scale_stage:
          scale_modifiers:
            ScaleWeightsModifier:
              factor: 2.0
              match: q_proj
    """))
    out = tmp_path / "out"
    result = _run(
        f"""
        from llmc.cli import main
        raise SystemExit(main(['oneshot', '--model', {str(llama_path)!r}, '--recipe', {str(recipe)!r},
                               '--output_dir', {str(out)!r}]))
        """,
        installed_plugin,
    )
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    before = load_file(llama_path / "model.safetensors")
    after = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (after[key] == 2 * before[key]).all()
    other = "model.layers.0.self_attn.k_proj.weight"
    assert (after[other] == before[other]).all()
    assert "ScaleWeightsModifier" in (out / "recipe.yaml").read_text()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_without_the_plugin_the_recipe_names_it_unknown(llama_path, tmp_path):
    from llmc import oneshot
    from llmc.recipe import RecipeError

    with pytest.raises(RecipeError, match="Unknown modifier 'ScaleWeightsModifier'.*Installed modifiers"):
        oneshot(model=str(llama_path), recipe="s:\n  m_modifiers:\n    ScaleWeightsModifier: {}\n")


def test_logs_of_every_plugin_package_are_configured(monkeypatch):
    from llmc import logs
    from llmc.hookspecs import hookimpl
    from llmc.modifiers import Modifier
    from llmc.plugins import registered_modifiers

    class Late:
        @hookimpl
        def llmc_register_pipelines(self, register):
            pass

    # a stage's modifier, from a package that is no plugin
    Elsewhere = type("Elsewhere", (Modifier,), {"__module__": "elsewhere.modifiers"})
    assert {"llmc", "llmc_pipelines", "llmc_gptq"} <= set(logs.logger_names())
    pm = get_plugin_manager()
    late, names = Late(), []
    pm.register(late, name="late")
    try:
        with registered_modifiers([Elsewhere()]):
            names = logs.logger_names()
        assert __name__.split(".")[0] in names  # a plugin registered at run time, by its package
        assert "elsewhere" not in names
        monkeypatch.setattr(logging.getLogger(), "handlers", [])  # an application that configured nothing
        logs.configure()
        for name in names:
            assert any(getattr(h, "_llmc_console", False) for h in logging.getLogger(name).handlers)
        monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])  # now it did
        logs.configure()
        for name in names:  # its handlers print llmc's records: a console handler of ours would repeat them
            assert not any(getattr(h, "_llmc_console", False) for h in logging.getLogger(name).handlers)
    finally:
        pm.unregister(late)
        for name in names:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if getattr(h, "_llmc_console", False)]:
                logger.removeHandler(handler)


def test_a_modifier_is_registered_only_for_the_hooks_it_acts_on():
    from llmc.hookspecs import hookimpl
    from llmc.modifiers import Modifier
    from llmc.plugins import registered_modifiers

    class Counting(Modifier):
        def on_batch_end(self, state, batch_index) -> None: ...

    class Direct(Modifier):  # implements the hook itself rather than its on_* method
        @hookimpl
        def llmc_batch_end(self, state, batch_index) -> None: ...

    idle, counting, direct = Modifier(), Counting(), Direct()
    with registered_modifiers([idle, counting, direct]) as hook:
        assert get_plugin_manager().is_registered(idle)

        def receivers(caller) -> set[int]:
            return {id(impl.plugin) for impl in caller.get_hookimpls()}

        assert receivers(hook.llmc_batch_end) == {id(counting), id(direct)}
        assert receivers(hook.llmc_calibration_start) == set()
    assert not hook.llmc_batch_end.get_hookimpls()


def test_llm_compressor_import_paths_resolve_through_the_registry():
    from llmc.modifiers import AWQModifier, GPTQModifier, QuantizationModifier, SmoothQuantModifier
    from llmc.modifiers.awq import AWQModifier as awq
    from llmc.modifiers.gptq import GPTQModifier as gptq
    from llmc.modifiers.quantization import GPTQModifier as gptq_there
    from llmc.modifiers.quantization import QuantizationModifier as quant
    from llmc.modifiers.smoothquant import SmoothQuantModifier as smooth
    from llmc.modifiers.transform import AWQModifier as awq_transform
    from llmc.modifiers.transform import SmoothQuantModifier as smooth_transform
    from llmc.modifiers.transform.awq import AWQModifier as awq_there
    from llmc.modifiers.transform.smoothquant import SmoothQuantModifier as smooth_there

    assert (awq, gptq, gptq_there, quant, smooth) == (
        AWQModifier, GPTQModifier, GPTQModifier, QuantizationModifier, SmoothQuantModifier
    )
    assert (awq_transform, awq_there, smooth_transform, smooth_there) == (
        AWQModifier, AWQModifier, SmoothQuantModifier, SmoothQuantModifier
    )


def test_llm_compressor_modifiers_llmc_lacks_are_named_so():
    """0.14's pruning modifiers that act during training (its oneshot leaves the model as it
    was with them): an ImportError that says so and names the one-shot pruners, not a guess at
    a similar name."""
    with pytest.raises(ImportError, match="ConstantPruningModifier prunes during training") as caught:
        from llmc.modifiers.pruning import ConstantPruningModifier  # noqa: F401
    assert "Did you mean" not in str(caught.value) and "SparseGPTModifier or WandaPruningModifier" in str(caught.value)
    with pytest.raises(ImportError, match="MagnitudePruningModifier prunes during training"):
        from llmc.modifiers.pruning import MagnitudePruningModifier  # noqa: F401


def test_a_missing_modifier_under_an_llm_compressor_path_names_its_package(fancy_provider):
    with pytest.raises(ImportError, match="pip install llmc-fancy"):
        from llmc.modifiers.awq import FancyModifier  # noqa: F401


def test_the_plugin_api_module_is_whole_and_builds_a_quantizing_modifier():
    """Every name of llmc.api exists; a quantizing modifier from it alone overrides one method."""
    import llmc.api as api

    for name in api.__all__:
        assert getattr(api, name) is not None, name
    assert issubclass(api.QuantizationModifier, api.Modifier)
    assert api.Modifier().pipeline() == "datafree"  # what core ships


def test_disabled_plugins_are_not_loaded(monkeypatch):
    from llmc import plugins

    monkeypatch.setenv(plugins.DISABLE_VARIABLE, "gptq, smoothquant")
    plugins.get_plugin_manager.cache_clear()
    try:
        registry = plugins.get_registry()
        assert not registry.has("modifier", "GPTQModifier") and not registry.has("modifier", "SmoothQuantModifier")
        assert registry.has("modifier", "AWQModifier")
        with pytest.raises(plugins.PluginNotFoundError, match="pip install llmc-gptq"):
            registry.get("modifier", "GPTQModifier")
    finally:
        plugins.get_plugin_manager.cache_clear()


def test_a_plugin_asking_for_the_registry_while_loading_gets_a_clear_error(monkeypatch):
    from llmc import plugins

    def load(self, group, name=None):  # a plugin module that does `from llmc.modifiers import X` on import
        from llmc.modifiers import QuantizationModifier  # noqa: F401

    monkeypatch.setattr(plugins._PluginManager, "load_setuptools_entrypoints", load)
    plugins.get_plugin_manager.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"Import what a plugin builds on from llmc.api"):
            plugins.get_plugin_manager()
    finally:
        monkeypatch.undo()
        plugins.get_plugin_manager.cache_clear()


def test_observe_sees_calibration_passes_only_and_removes_its_hook(llama_path):
    """A modifier's observe() skips the sequential pipeline's propagation passes (a plain
    forward hook sees every batch twice per layer) and is gone after calibration."""
    from llmc import oneshot
    from llmc.api import Modifier

    seen = []

    class Counting(Modifier):
        def pipeline(self) -> str:
            return "sequential"

        def on_calibration_start(self, state) -> None:
            self.observe(state, state.model.model.layers[0].mlp.down_proj, lambda x: seen.append(x.shape[0]))

    model = oneshot(model=str(llama_path), recipe=[Counting()], dataset="llmc-docs", num_calibration_samples=3,
                    max_seq_length=16)
    assert len(seen) == 3  # once per batch, not twice
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_recipe_values_are_checked_by_type_when_the_recipe_is_read(capsys):
    """Before any model is loaded; a plugin's modifier without @attrs.define is named."""
    from llmc.cli import main
    from llmc.plugins import _registrar
    from llmc.recipe import Recipe, RecipeError

    with pytest.raises(RecipeError, match=r"AWQModifier argument 'n_grid' must be int, got 'abc'"):
        Recipe.load("q_modifiers:\n  AWQModifier: {n_grid: abc}\n")
    with pytest.raises(RecipeError, match=r"'dampening_frac' must be float"):
        Recipe.load("q_modifiers:\n  GPTQModifier: {dampening_frac: [1]}\n")
    assert Recipe.load("q_modifiers:\n  GPTQModifier: {dampening_frac: 1, targets: Linear, scheme: W4A16}\n").modifiers[0].targets == ["Linear"]

    from llmc.api import QuantizationModifier

    class Undecorated(QuantizationModifier):
        steps = 3

    with pytest.raises(TypeError, match=r"Undecorated is not an attrs class: decorate it with @attrs.define"):
        _registrar("modifier", lambda name, obj: None)(Undecorated)
    assert main(["plugins", "--modifier", "GPTQModifier"]) == 0
    listed = capsys.readouterr().out
    assert "dampening_frac" in listed and "0.01" in listed and "block_size" in listed


def test_the_saved_recipe_names_the_plugins_that_ran(llama_path, tmp_path):
    from llmc import __version__, oneshot
    from llmc.recipe import Recipe

    oneshot(model=str(llama_path), recipe="q_modifiers:\n  GPTQModifier: {scheme: W4A16, ignore: [lm_head]}\n",
            dataset="llmc-docs", num_calibration_samples=2, max_seq_length=16, output_dir=str(tmp_path / "out"))
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    assert saved.startswith(f"# made by llmc with llmc-gptq {__version__}\n")
    assert type(Recipe.load(str(tmp_path / "out" / "recipe.yaml")).modifiers[0]).__name__ == "GPTQModifier"


def test_the_demo_picks_the_installed_quantizer_that_declares_the_most_strength():
    import attrs

    from llmc.api import QuantizationModifier, hookimpl
    from llmc.demo import strongest_algorithm

    assert strongest_algorithm() == "AutoRoundModifier"  # AutoRound 3, GPTQ 2, AWQ 1, round-to-nearest 0

    @attrs.define(kw_only=True)
    class StrongerModifier(QuantizationModifier):
        strength = 5

    class Plugin:
        @hookimpl
        def llmc_register_modifiers(self, register):
            register(StrongerModifier)

    pm, plugin = get_plugin_manager(), Plugin()
    pm.register(plugin, name="stronger")
    try:
        assert strongest_algorithm() == "StrongerModifier"  # no list of names to edit
    finally:
        pm.unregister(plugin)


def test_autorounds_dataset_helper_leaves_rows_as_they_are():
    """0.14's fix_batch_if_needed works around the auto-round library's masks; llmc's
    AutoRound needs no change, so the helper returns the row unchanged."""
    from llmc.modifiers.autoround import fix_batch_if_needed

    row = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}
    assert fix_batch_if_needed(dict(row)) == row
