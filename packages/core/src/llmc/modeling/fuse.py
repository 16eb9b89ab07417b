"""llm-compressor 0.14's ``llmcompressor.modeling.fuse``."""

from llmc.transforms import center_embeddings, fuse_norm_linears

__all__ = ["center_embeddings", "fuse_norm_linears"]
