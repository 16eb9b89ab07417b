"""llm-compressor 0.14's import path ``llmcompressor.modifiers.transform`` (where its AWQ and
SmoothQuant modifiers live): every modifier name resolves through the plugin registry, as in
:mod:`llmc.modifiers`, and ``AWQMapping`` is llmc's mapping (:class:`llmc.mappings.Mapping`)."""

from llmc.mappings import AWQMapping  # noqa: F401
from llmc.modifiers import __dir__, __getattr__  # noqa: F401
