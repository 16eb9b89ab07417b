"""llmc's REAP plugin: ``REAPPruningModifier`` (MoE expert pruning by router-weighted activations)."""
