"""llmc-pipelines: calibration pipelines that run forward passes."""

__version__ = "0.1.0"
