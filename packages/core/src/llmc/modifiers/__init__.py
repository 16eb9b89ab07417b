"""Modifiers by name: ``from llmc.modifiers import GPTQModifier``.

Every name other than the base class resolves through the plugin registry, so
a modifier from a third-party plugin imports exactly like a built-in one, and a
missing plugin is an ImportError that names the package to install.
"""

from __future__ import annotations

from typing import Any

from llmc.modifiers.base import Modifier

__all__ = ["Modifier"]


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)
    from llmc.plugins import PluginNotFoundError, get_registry

    try:
        return get_registry().get("modifier", name)
    except PluginNotFoundError as exc:
        raise ImportError(str(exc), name=name) from None


def __dir__() -> list[str]:
    from llmc.plugins import get_registry

    return sorted({*__all__, *get_registry().names("modifier")})
