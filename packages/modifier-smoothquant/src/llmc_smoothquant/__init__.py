"""llmc-smoothquant: SmoothQuantModifier (Xiao et al., 2023)."""
