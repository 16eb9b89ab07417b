"""Quantization helpers shared by every quantizing modifier."""
