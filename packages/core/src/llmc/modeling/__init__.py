"""llm-compressor 0.14's ``llmcompressor.modeling``: helpers that prepare a model before
``oneshot``. The norm and embedding fusions are :mod:`llmc.transforms`'; the MoE helpers in
:mod:`llmc.modeling.moe` come with the ``llmc-moe`` distribution."""

from llmc.transforms import center_embeddings, fuse_norm_linears

__all__ = ["center_embeddings", "fuse_norm_linears"]
