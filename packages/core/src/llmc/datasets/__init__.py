"""llm-compressor's ``llmcompressor.datasets`` helpers that scripts import, same names."""
