"""llm-compressor 0.14's import path ``llmcompressor.modifiers.transform.awq``: as
:mod:`llmc.modifiers.transform`."""

from llmc.modifiers.transform import AWQMapping, __dir__, __getattr__  # noqa: F401
