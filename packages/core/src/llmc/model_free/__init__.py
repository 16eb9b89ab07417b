"""Data-free quantization straight on safetensors shards, never building the model."""

from __future__ import annotations

from llmc.model_free.reindex import reindex_fused_weights
from llmc.model_free.run import Summary, model_free_ptq

__all__ = ["Summary", "model_free_ptq", "reindex_fused_weights"]
