"""Marking forward pre-hooks that only read what a module is given.

When a calibration pass's outputs are thrown away, the sequential pipeline stops each batch
after the layer's last hooked module (``llmc_pipelines.sequential.EarlyExit``). If every
pre-hook of that module is marked here, the module's own forward is skipped too (the down
projection's product, for GPTQ's Hessians); an unmarked pre-hook may prepare something the
forward uses (the KV cache observers substitute the attention's cache), so the pipeline then
stops only after the forward has run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

Hook = TypeVar("Hook", bound=Callable[..., object])


def input_only(hook: Hook) -> Hook:
    """Mark ``hook`` (a forward pre-hook, or the function of a method used as one) as reading
    the module's input and nothing else: skipping the module's forward after it loses nothing."""
    hook.llmc_input_only = True  # type: ignore[attr-defined]
    return hook


def is_input_only(hook: Callable[..., object]) -> bool:
    return bool(getattr(hook, "llmc_input_only", False))
