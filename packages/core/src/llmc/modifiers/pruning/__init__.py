"""llm-compressor 0.14's import path ``llmcompressor.modifiers.pruning``: every modifier name resolves
through the plugin registry, as in :mod:`llmc.modifiers` (``SparseGPTModifier`` from
``llmc-sparsegpt``; 0.14's other pruning modifiers have no llmc package yet: asking for one is
an ImportError that says so)."""

from llmc.modifiers import __dir__, __getattr__  # noqa: F401
