"""Recipes in llm-compressor's shape: stages that hold ``*_modifiers`` groups.

    quant_stage:
      quant_modifiers:
        QuantizationModifier:
          targets: ["Linear"]
          scheme: W4A16
          ignore: ["lm_head"]

``*_modifiers`` groups written at the top level, outside any stage, form one stage that
runs before the named stages (llm-compressor 0.14 ignores them; llmc runs what it is given).
A recipe may also be a modifier object or a list of them. An optional top-level
``args:`` mapping holds variables that values reference as ``eval(name)``;
``recipe_args`` entries (``key=value``) override those variables, or set any
value by its dotted path (``quant_stage.quant_modifiers.QuantizationModifier.scheme=W8A16``).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from llmc.modifiers.base import Modifier
from llmc.plugins import get_registry

logger = logging.getLogger(__name__)

DEFAULT_STAGE = "default_stage"
DEFAULT_GROUP = "default_modifiers"
_STAGE_KEYS_IGNORED = {"run_type"}
_EVAL = re.compile(r"^eval\((.+)\)$")


class RecipeError(ValueError):
    """The recipe cannot be read or does not describe runnable modifiers."""


@attrs.frozen
class Stage:
    name: str
    groups: tuple[tuple[str, tuple[Modifier, ...]], ...]

    @property
    def modifiers(self) -> list[Modifier]:
        return [m for _, group in self.groups for m in group]


@attrs.frozen
class Recipe:
    stages: tuple[Stage, ...]

    @property
    def modifiers(self) -> list[Modifier]:
        return [m for stage in self.stages for m in stage.modifiers]

    @classmethod
    def load(
        cls,
        recipe: Any,
        recipe_args: Iterable[str] | Mapping[str, Any] | str | None = None,
        stage: str | None = None,
    ) -> Recipe:
        """Read any accepted recipe form, apply overrides, and select ``stage``. ``None``, as
        llm-compressor allows it, is one stage without modifiers: the pipeline's forward passes
        run (a benchmark of the pipeline alone) and nothing is quantized."""
        if recipe is None:
            if recipe_args:
                raise RecipeError("recipe_args were given without a recipe: pass recipe= (a YAML file or string, or modifiers).")
            logger.warning("No recipe given: nothing will be quantized (pass recipe= to compress the model).")
            return cls((Stage(DEFAULT_STAGE, ()),))
        overrides = _parse_overrides(recipe_args)
        if isinstance(recipe, Modifier):
            recipe = [recipe]
        if isinstance(recipe, (list, tuple)) and all(isinstance(m, Modifier) for m in recipe):
            if overrides:
                raise RecipeError("recipe_args only apply to YAML recipes, not modifier objects.")
            loaded = cls((Stage(DEFAULT_STAGE, ((DEFAULT_GROUP, tuple(recipe)),)),))
        elif isinstance(recipe, (list, tuple)):
            parts = [_read_yaml(item) for item in recipe]
            merged: dict[str, Any] = {}
            for part in parts:
                merged.update(part)
            loaded = cls.from_dict(merged, overrides)
        elif isinstance(recipe, (str, os.PathLike)):
            loaded = cls.from_dict(_read_yaml(recipe), overrides)
        elif isinstance(recipe, Mapping):
            loaded = cls.from_dict(dict(recipe), overrides)
        else:
            raise RecipeError(f"Cannot read a recipe from {type(recipe).__name__}.")
        return loaded.select(stage)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
        data = copy.deepcopy(data)
        variables = dict(data.pop("args", None) or {})
        data.pop("version", None)
        referenced = _referenced(data)
        for key, value in (overrides or {}).items():
            if "." in key and key not in variables:
                _set_path(data, key, value)
            elif key in variables or key in referenced:
                variables[key] = value
            else:
                declared = sorted(set(variables) | referenced)
                raise RecipeError(
                    f"recipe_args key {key!r} is no variable of the recipe ("
                    + (f"its variables: {', '.join(declared)}" if declared else "it declares none under 'args:'")
                    + "). Set a value by its dotted path instead, e.g. "
                    "quant_stage.quant_modifiers.QuantizationModifier.scheme=W8A16."
                )
        data = _substitute(data, variables)
        stages: list[Stage] = []
        loose: list[tuple[str, tuple[Modifier, ...]]] = []
        for key, value in data.items():
            if key.endswith("_modifiers"):
                loose.append((key, _build_group(key, value)))
            elif isinstance(value, Mapping):
                stages.append(_build_stage(key, value))
            else:
                raise RecipeError(
                    f"Unexpected recipe key {key!r}: top-level keys are stages (mappings holding "
                    "'*_modifiers' groups), '*_modifiers' groups, 'args' or 'version'."
                )
        if loose:
            stages.insert(0, Stage(DEFAULT_STAGE, tuple(loose)))
        if not stages or not any(stage.modifiers for stage in stages):
            raise RecipeError("The recipe defines no modifiers.")
        return cls(tuple(stages))

    def select(self, stage: str | None) -> Recipe:
        if stage is None:
            return self
        chosen = tuple(s for s in self.stages if s.name == stage)
        if not chosen:
            names = ", ".join(s.name for s in self.stages)
            raise RecipeError(f"The recipe has no stage {stage!r}; its stages are: {names}.")
        return Recipe(chosen)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stage in self.stages:
            groups: dict[str, Any] = {}
            for group_name, modifiers in stage.groups:
                names = [type(m).__name__ for m in modifiers]
                if len(set(names)) == len(names):
                    groups[group_name] = {type(m).__name__: m.recipe_args() for m in modifiers}
                else:
                    groups[group_name] = [{type(m).__name__: m.recipe_args()} for m in modifiers]
            out[stage.name] = groups
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_saved_yaml(self) -> str:
        """The recipe as a checkpoint records it: headed by a comment naming the distributions
        (and versions) of the plugins that provided its modifiers."""
        registry = get_registry()
        providers = {}
        for modifier in self.modifiers:
            name = type(modifier).__name__
            entry = next((e for e in registry.of_kind("modifier") if e.name == name), None)
            if entry is not None:
                providers[entry.distribution or entry.plugin] = entry.version
        made_by = ", ".join(f"{d} {v}" if v else d for d, v in providers.items())
        return f"# made by llmc with {made_by}\n" + self.to_yaml() if made_by else self.to_yaml()


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader, plus two tags llm-compressor's recipe.yaml writes, read as data:
    ``!!python/tuple`` (SmoothQuant mappings) as a list, and its ``Sentinel`` for an argument
    left unset (AWQ's ``offload_device``) as None. Nothing is imported or executed."""


_RecipeLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node, deep=True)
)
_RecipeLoader.add_constructor(
    "tag:yaml.org,2002:python/object/apply:llmcompressor.sentinel.Sentinel", lambda loader, node: None
)


def _read_yaml(source: str | os.PathLike) -> dict[str, Any]:
    text = str(source)
    path = Path(text)
    one_line = "\n" not in text and len(text) < 4096
    # a file wins: its name may hold ':' (YAML's mapping mark) as a path rarely does otherwise
    looks_like_path = one_line and (path.is_file() or ":" not in text.split("/")[-1])
    if looks_like_path:
        if not path.is_file():
            raise RecipeError(f"Recipe file not found: {text}")
        text = path.read_text()
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"Malformed recipe YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(
            f"A recipe must be a YAML mapping of stages or modifier groups, got {type(data).__name__}."
        )
    return data


def _parse_overrides(recipe_args: Any) -> dict[str, Any]:
    if recipe_args is None:
        return {}
    if isinstance(recipe_args, Mapping):
        return dict(recipe_args)
    items = [recipe_args] if isinstance(recipe_args, str) else list(recipe_args)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"recipe_args entries must look like key=value, got {item!r}.")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = data
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            raise RecipeError(f"recipe_args key {dotted!r} names no value in the recipe (at {part!r}).")
        node = node[part]
    if not isinstance(node, dict):
        raise RecipeError(f"recipe_args key {dotted!r} does not lead to a mapping.")
    node[leaf] = value


def _referenced(value: Any) -> set[str]:
    """The variables a recipe's values reference as ``eval(name)``."""
    if isinstance(value, dict):
        return set().union(*(_referenced(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_referenced(v) for v in value))
    if isinstance(value, str) and (match := _EVAL.match(value.strip())):
        return {match.group(1).strip()}
    return set()


def _substitute(value: Any, variables: Mapping[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, str) and (match := _EVAL.match(value.strip())):
        name = match.group(1).strip()
        if name not in variables:
            raise RecipeError(f"Recipe value {value!r} references {name!r}, which 'args' does not define.")
        return variables[name]
    return value


def _build_stage(name: str, body: Mapping[str, Any]) -> Stage:
    groups = []
    for key, value in body.items():
        if key in _STAGE_KEYS_IGNORED:
            continue
        if not key.endswith("_modifiers"):
            raise RecipeError(
                f"Stage {name!r} has key {key!r}; a stage holds '*_modifiers' groups."
            )
        groups.append((key, _build_group(key, value)))
    return Stage(name, tuple(groups))


def _build_group(name: str, body: Any) -> tuple[Modifier, ...]:
    if isinstance(body, Mapping):
        entries = list(body.items())
    elif isinstance(body, list) and all(isinstance(e, Mapping) and len(e) == 1 for e in body):
        entries = [next(iter(e.items())) for e in body]
    else:
        raise RecipeError(f"Group {name!r} must map modifier names to their arguments.")
    registry = get_registry()
    modifiers = []
    for modifier_name, args in entries:
        if not registry.has("modifier", modifier_name):
            raise RecipeError(registry.missing_message("modifier", modifier_name))
        cls = registry.get("modifier", modifier_name)
        if args is not None and not isinstance(args, Mapping):
            raise RecipeError(f"Arguments of {modifier_name} must be a mapping, got {args!r}.")
        try:
            modifiers.append(cls.from_recipe_args(dict(args or {})))
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{modifier_name} in group {name!r}: {exc}") from exc
    return tuple(modifiers)
