"""Llama 4: experts called on router-scaled copies of every token.

Llama 4's MoE block multiplies each token by its routing score *before* the
experts (a score of zero for the experts not chosen) and runs every expert on
every copy. After linearization the block asks its router for the top-k experts
and calls :class:`~llmc_moe.experts.LinearExperts` with ``scale_inputs``: the same
sum, without the zero-input work, and with all-experts calibration available.
"""

from __future__ import annotations

import torch
from torch import nn


def llama4_block_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Llama4TextMoe.forward`` over linearized experts."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)
    weights, indices = torch.topk(router_scores, self.top_k, dim=-1)  # the sigmoids of the chosen
    out = self.shared_expert(hidden_states)
    out.add_(self.experts(hidden_states, indices, weights))
    return out, router_logits


def adapt_llama4_block(block: nn.Module) -> None:
    """Give this one block the linearized forward (a subclass, so the block keeps its type)."""
    cls = type(block)
    adapted = type(f"Linearized{cls.__name__}", (cls,), {"forward": llama4_block_forward})
    block.__class__ = adapted
