"""llmc's QuIP plugin: ``QuIPModifier`` (Hadamard incoherence rotations through compressed-tensors' transforms)."""
