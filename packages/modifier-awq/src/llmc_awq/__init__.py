"""llmc-awq: AWQModifier (Lin et al., 2023)."""
