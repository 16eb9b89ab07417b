"""llmc-autoround: AutoRound (Cheng et al., 2024) as an llmc plugin."""
