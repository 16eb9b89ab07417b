"""llm-compressor's import path ``llmcompressor.modifiers.awq``: every modifier name resolves
through the plugin registry, as in :mod:`llmc.modifiers`, so a script needs only
``llmcompressor`` replaced by ``llmc``; ``AWQMapping`` is llmc's mapping."""

from llmc.mappings import AWQMapping  # noqa: F401
from llmc.modifiers import __dir__, __getattr__  # noqa: F401
