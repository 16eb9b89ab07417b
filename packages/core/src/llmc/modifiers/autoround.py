"""llm-compressor's import path ``llmcompressor.modifiers.autoround``: every modifier name
resolves through the plugin registry, as in :mod:`llmc.modifiers`, so a script needs only
``llmcompressor`` replaced by ``llmc``."""

from llmc.modifiers import __dir__, __getattr__  # noqa: F401
