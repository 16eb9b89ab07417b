"""llmc-gptq: the GPTQ algorithm as an llmc modifier."""

__version__ = "0.1.0"
