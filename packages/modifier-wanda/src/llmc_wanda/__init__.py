"""llmc's Wanda plugin: ``WandaPruningModifier`` (pruning by weight magnitude × input norm)."""
