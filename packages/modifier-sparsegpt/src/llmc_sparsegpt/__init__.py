"""llmc's SparseGPT plugin: ``SparseGPTModifier`` (unstructured or N:M pruning such as 2:4)."""
