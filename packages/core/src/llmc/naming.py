"""The names recipes know modules by, where llmc names a module otherwise.

llmc-moe names a linearized expert's projections as the family's checkpoint does (Mixtral's,
MiniMax's and DeepSeek-V4's ``w1``/``w3``/``w2``), so that the saved keys are the checkpoint's;
llm-compressor 0.14 names them ``gate_proj``/``up_proj``/``down_proj`` in the model, and its
recipes say so (``re:.*mlp\\..*(gate|up|down)_proj$``). A module that declares the leaf name
recipes use for it (:data:`RECIPE_NAME`) is matched under both names: by targets, by ignore and
by smooth/balance mappings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressed_tensors.utils import is_match

# attribute of a module: the last part of its name as llm-compressor's recipes write it
RECIPE_NAME = "llmc_recipe_name"


def recipe_names(model: torch.nn.Module) -> dict[str, str]:
    """Full names of the modules that declare a recipe name, and that name in full."""
    names = {}
    for name, module in model.named_modules():
        leaf = getattr(module, RECIPE_NAME, None)
        if leaf is not None:
            names[name] = f"{name.rpartition('.')[0]}.{leaf}" if "." in name else leaf
    return names


def by_recipe_names(model: torch.nn.Module, patterns: Sequence[str], ignore: Sequence[str] = ()) -> list[str]:
    """The modules that ``patterns`` select (and ``ignore`` does not) only under their recipe
    names, by their real names: added to targets (or ignore), the recipe selects them."""
    aliases = recipe_names(model)
    if not aliases or not patterns:
        return []
    modules = dict(model.named_modules())
    found = []
    for name, alias in aliases.items():
        module = modules[name]
        if is_match(name, module, patterns) or not is_match(alias, module, patterns):
            continue
        if ignore and (is_match(name, module, ignore) or is_match(alias, module, ignore)):
            continue
        found.append(name)
    return found
