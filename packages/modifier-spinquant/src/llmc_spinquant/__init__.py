"""llmc's SpinQuant plugin: ``SpinQuantModifier`` (Hadamard rotations R1–R4 through compressed-tensors' transforms)."""
