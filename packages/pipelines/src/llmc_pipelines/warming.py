"""Attention's first call, made on a thread while the sequential pipeline captures its inputs.

On Hopper, torch's ``scaled_dot_product_attention`` prefers cuDNN, whose first call on the
H200 machine took 1.1 s (0.7 s more for the first length not a multiple of 64), with the
GPU idle, inside the first layer's calibration. Made first on another thread, that call
took 80 ms, and the pipeline's own first call 77 ms (``benchmarks/README.md``, session 21).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

_TOKENS = 256  # the stand-in's sequence length; any length loads the same libraries


def warm_attention(config: Any, dtype: torch.dtype, device: torch.device) -> None:
    """One causal ``scaled_dot_product_attention`` call shaped as ``config``'s attention (its
    query and key/value heads and head size) in ``dtype`` on ``device``; nothing if the config
    does not say its heads."""
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    query = torch.zeros(1, heads, _TOKENS, head_dim, dtype=dtype, device=device)
    key = torch.zeros(1, kv_heads, _TOKENS, head_dim, dtype=dtype, device=device)
    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(query, key, key, is_causal=True, enable_gqa=kv_heads != heads)


def start_attention_warm_up(model: torch.nn.Module, device: torch.device) -> threading.Thread | None:
    """A thread making ``model``'s first attention call (:func:`warm_attention`), when the
    model runs torch's SDPA attention on CUDA; None otherwise. A failure there is only logged:
    the model's own first call meets whatever caused it."""
    config = getattr(model, "config", None)
    if device.type != "cuda" or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dtype = next(model.parameters()).dtype

    def run() -> None:
        try:
            torch.cuda.set_device(device)
            warm_attention(text, dtype, device)
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - see above
            logger.debug("Attention warm-up failed: %s", exc)

    thread = threading.Thread(target=run, name="llmc-attention-warm-up", daemon=True)
    thread.start()
    return thread
