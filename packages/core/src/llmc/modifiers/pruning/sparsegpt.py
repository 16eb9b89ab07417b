"""llm-compressor 0.14's import path ``llmcompressor.modifiers.pruning.sparsegpt``: names resolve
through the plugin registry (``SparseGPTModifier`` from ``llmc-sparsegpt``)."""

from llmc.modifiers import __dir__, __getattr__  # noqa: F401
