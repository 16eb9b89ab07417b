"""llm-compressor 0.14's import path ``llmcompressor.modifiers.obcq`` (where ``SparseGPTModifier``
lived before ``pruning.sparsegpt``): every modifier name resolves through the plugin registry,
as in :mod:`llmc.modifiers`."""

from llmc.modifiers import __dir__, __getattr__  # noqa: F401
