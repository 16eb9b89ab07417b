"""The plugin manager and the registry it builds.

Everything llmc can run (modifiers, pipelines, savers, datasets, model patches)
comes from a plugin found on the ``llmc`` entry-point group, core's own
built-ins included. Nothing is discovered at import time: the manager is built
on first use.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import pluggy

from llmc import hookspecs
from llmc.modifiers.base import Modifier

ENTRY_POINT_GROUP = "llmc"

# First-party names and the distribution that provides them, so that a missing
# plugin produces an install hint instead of a bare "unknown name".
KNOWN_PROVIDERS: dict[str, str] = {
    "GPTQModifier": "llmc-gptq",
    "AWQModifier": "llmc-awq",
    "AutoRoundModifier": "llmc-autoround",
    "SmoothQuantModifier": "llmc-smoothquant",
    "LogarithmicEqualizationModifier": "llmc-smoothquant",
    "SparseGPTModifier": "llmc-sparsegpt",
    "REAPPruningModifier": "llmc-reap",
    "QuIPModifier": "llmc-quip",
    "SpinQuantModifier": "llmc-spinquant",
    "WandaPruningModifier": "llmc-wanda",
    "basic": "llmc-pipelines",
    "sequential": "llmc-pipelines",
}
# llm-compressor 0.14's modifiers that no llmc package provides, and why: said when asked for
_TRAINING_ONLY = (
    "prunes during training, which llmc does not do (llm-compressor 0.14's oneshot leaves the model as "
    "it was with it); for one-shot pruning use SparseGPTModifier or WandaPruningModifier (llmc-sparsegpt, "
    "llmc-wanda)."
)
NOT_PROVIDED: dict[str, str] = {"MagnitudePruningModifier": _TRAINING_ONLY, "ConstantPruningModifier": _TRAINING_ONLY}
DISABLE_VARIABLE = "LLMC_DISABLE_PLUGINS"  # comma-separated plugin (entry point) names not to load

_MODIFIER_PREFIX = "modifier:"


class PluginNotFoundError(LookupError):
    """A recipe or argument names something no installed plugin provides."""


@attrs.frozen
class Registration:
    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str | None
    version: str | None


@attrs.frozen
class Registry:
    """What every installed plugin registered, with who registered it."""

    entries: tuple[Registration, ...]

    def names(self, kind: str) -> list[str]:
        return [e.name for e in self.entries if e.kind == kind]

    def of_kind(self, kind: str) -> list[Registration]:
        return [e for e in self.entries if e.kind == kind]

    def get(self, kind: str, name: str) -> Any:
        for entry in self.entries:
            if entry.kind == kind and entry.name == name:
                return entry.obj
        raise PluginNotFoundError(self.missing_message(kind, name))

    def has(self, kind: str, name: str) -> bool:
        return any(e.kind == kind and e.name == name for e in self.entries)

    def missing_message(self, kind: str, name: str) -> str:
        installed = self.names(kind)
        msg = f"Unknown {kind} {name!r}."
        if name in KNOWN_PROVIDERS:
            msg += f" It is provided by {KNOWN_PROVIDERS[name]}: pip install {KNOWN_PROVIDERS[name]}."
        elif name in NOT_PROVIDED:
            msg += f" llm-compressor's {name} {NOT_PROVIDED[name]}"
        else:
            close = difflib.get_close_matches(name, installed, n=1)
            if close:
                msg += f" Did you mean {close[0]!r}?"
        msg += f" Installed {kind}s: {', '.join(sorted(installed)) or 'none'}."
        return msg


class _PluginManager(pluggy.PluginManager):
    """Registers of a modifier only the hooks it acts on (:meth:`Modifier.handles`)."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> pluggy.HookimplOpts | None:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None and isinstance(plugin, Modifier) and not plugin.handles(name):
            return None
        return opts


class _Loading:
    """Whether the plugin manager is being built: a plugin that asks for the registry while it
    is imported (``from llmc.modifiers import X`` at its top) would build a second one."""

    active = False


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The one plugin manager, loaded from the ``llmc`` entry-point group, less the plugins
    ``$LLMC_DISABLE_PLUGINS`` names (pluggy's ``set_blocked``)."""
    if _Loading.active:
        raise RuntimeError(
            "An llmc plugin asked for the plugin registry while plugins were being loaded, e.g. with "
            "`from llmc.modifiers import QuantizationModifier` at the top of its module. Import "
            "what a plugin builds on from llmc.api instead (from llmc.api import QuantizationModifier)."
        )
    pm = _PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in filter(None, (n.strip() for n in os.environ.get(DISABLE_VARIABLE, "").split(","))):
        pm.set_blocked(name)
    _Loading.active = True
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    finally:
        _Loading.active = False
    return pm


def _plugins(pm: pluggy.PluginManager) -> list[tuple[str, Any]]:
    """(name, plugin) of every plugin, the modifiers registered for a running stage aside."""
    return [(n, p) for n, p in pm.list_name_plugin() if not n.startswith(_MODIFIER_PREFIX)]


def plugin_packages() -> set[str]:
    """The top-level package of every plugin."""
    packages = set()
    for _, plugin in _plugins(get_plugin_manager()):
        module = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__
        packages.add(module.split(".")[0])
    return packages


def _distribution_of(pm: pluggy.PluginManager) -> dict[int, tuple[str, str]]:
    return {
        id(plugin): (dist.project_name, dist.version)
        for plugin, dist in pm.list_plugin_distinfo()
    }


_REGISTRATION_HOOKS: dict[str, str] = {
    "modifier": "llmc_register_modifiers",
    "pipeline": "llmc_register_pipelines",
    "saver": "llmc_register_savers",
    "dataset": "llmc_register_datasets",
    "model_patch": "llmc_register_model_patches",
    "converter": "llmc_register_converters",
    "mapping": "llmc_register_mappings",
    "observer": "llmc_register_observers",
}


def _registrar(kind: str, sink: Callable[[str, Any], None]) -> Callable[..., None]:
    """The ``register`` callable handed to one plugin for one kind."""
    if kind == "modifier":

        def register_modifier(cls: type) -> None:
            if "__attrs_attrs__" not in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__} is not an attrs class: decorate it with @attrs.define(kw_only=True) "
                    "so that its fields are its recipe arguments."
                )
            sink(cls.__name__, cls)

        return register_modifier
    if kind == "pipeline":

        def register_pipeline(name: str, run: Callable[..., None], requires_data: bool = True) -> None:
            from llmc.pipelines import Pipeline

            sink(name, Pipeline(run, requires_data))

        return register_pipeline
    if kind == "mapping":

        def register_mappings(algorithm: str, architecture: str, mappings: Iterable[Any]) -> None:
            from llmc.mappings import Mapping, mapping_key

            sink(mapping_key(algorithm, architecture), tuple(Mapping.parse(m) for m in mappings))

        return register_mappings
    if kind == "model_patch":
        return lambda patch: sink(getattr(patch, "name", type(patch).__name__), patch)
    return lambda name, obj: sink(name, obj)


def _sink(
    entries: list[Registration], kind: str, plugin: str, dist: str | None, version: str | None
) -> Callable[[str, Any], None]:
    """Append one plugin's registrations of one kind, refusing name clashes."""

    def add(name: str, obj: Any) -> None:
        for e in entries:
            if e.kind == kind and e.name == name:
                raise ValueError(
                    f"{kind} {name!r} is registered twice: by plugin {e.plugin!r} "
                    f"and by plugin {plugin!r}. Uninstall one of them."
                )
        entries.append(Registration(kind, name, obj, plugin, dist, version))

    return add


def _collect(pm: pluggy.PluginManager) -> Registry:
    plugins = [p for _, p in _plugins(pm)]
    dists = _distribution_of(pm)
    entries: list[Registration] = []
    for plugin in plugins:
        others = [p for p in plugins if p is not plugin]
        plugin_name = pm.get_name(plugin) or repr(plugin)
        dist, version = dists.get(id(plugin), (None, None))
        for kind, hook_name in _REGISTRATION_HOOKS.items():
            caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
            sink = _sink(entries, kind, plugin_name, dist, version)
            caller(register=_registrar(kind, sink))
    return Registry(tuple(entries))


@functools.cache
def _registry_for(pm_id: int, plugin_names: tuple[str, ...]) -> Registry:
    return _collect(get_plugin_manager())


def get_registry() -> Registry:
    """The registry of the current plugin set (rebuilt if plugins were added).

    Modifiers registered for a running stage provide nothing and are left out
    of the cache key.
    """
    pm = get_plugin_manager()
    names = tuple(name for name, _ in _plugins(pm))
    return _registry_for(id(pm), names)


@contextlib.contextmanager
def registered_modifiers(modifiers: Iterable[Any]) -> Iterator[pluggy.HookRelay]:
    """Register ``modifiers`` with the plugin manager while their stage runs.

    Pluggy calls implementations last-registered-first, so modifiers are
    registered in reverse to be called in recipe order.
    """
    pm = get_plugin_manager()
    modifiers = list(modifiers)
    for modifier in reversed(modifiers):
        pm.register(modifier, name=f"{_MODIFIER_PREFIX}{type(modifier).__name__}:{id(modifier)}")
    try:
        yield pm.hook
    finally:
        for modifier in modifiers:
            if pm.is_registered(modifier):
                pm.unregister(modifier)
