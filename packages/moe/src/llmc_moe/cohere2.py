"""Cohere2-MoE made ready for rotations (SpinQuant), as llm-compressor 0.14's
``prepare_cohere2_moe_for_spinquant`` makes it.

A rotation of the residual stream (R1) is fused into every ``Linear`` that reads it. Cohere2-MoE
has two readers that are not such Linears: its experts (fused 3-D weights) and its router (a
plain weight matrix). Its one norm per layer also feeds the attention, the MLP and the router in
parallel, across modules no norm mapping groups. :func:`prepare_cohere2_moe_for_spinquant`
linearizes the experts, puts each router's matrix in a ``Linear`` (``mlp.gate.linear``, 0.14's
name) and folds each layer's norm into all its readers. Every step keeps the model's function.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llmc.transforms import fuse_norm_linears
from llmc_moe.linearize import linearize

logger = logging.getLogger(__name__)

ROUTER_CLASS = "Cohere2MoeTopKRouter"


class LinearRouter(nn.Module):
    """Cohere2-MoE's top-k router with its matrix in ``self.linear``: the same logits, scores and
    picks, and a Linear that a rotation can be fused into."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.top_k = router.top_k
        self.num_experts = router.num_experts
        self.expert_selection_fn = router.expert_selection_fn
        self.norm_topk_prob = router.norm_topk_prob
        experts, hidden = router.weight.shape
        self.linear = nn.Linear(hidden, experts, bias=False, dtype=router.weight.dtype, device=router.weight.device)
        with torch.no_grad():
            self.linear.weight.copy_(router.weight)
        if self.expert_selection_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"expert_selection_fn must be 'softmax' or 'sigmoid', got {self.expert_selection_fn!r}.")

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.linear(hidden_states)
        scores, picked = torch.topk(logits, self.top_k, dim=-1)
        if self.expert_selection_fn == "softmax":
            scores = torch.softmax(scores, dim=-1, dtype=torch.float)
        else:
            scores = torch.sigmoid(scores)
            if self.norm_topk_prob:
                scores = scores / scores.sum(dim=-1, keepdim=True)
        return logits, scores.to(hidden_states.dtype), picked


def _norm_readers(layer: nn.Module) -> list[nn.Linear]:
    """The Linears that read a layer's ``input_layernorm`` (Cohere's parallel block): q/k/v,
    every gate/up projection of its MLP (dense, routed or shared experts) and its router."""
    attention = layer.self_attn
    readers = [attention.q_proj, attention.k_proj, attention.v_proj]
    for name, module in layer.mlp.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in ("gate_proj", "up_proj"):
            readers.append(module)
    router = getattr(layer.mlp, "gate", None)
    if isinstance(router, LinearRouter):
        readers.append(router.linear)
    return readers


@torch.no_grad()
def prepare_cohere2_moe_for_spinquant(model: nn.Module) -> nn.Module:
    """Linearize ``model``'s experts, give each router a Linear and fold each layer's norm into
    its readers, in place (see the module doc); call it before ``oneshot`` with SpinQuant.
    Returns the model."""
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "rms_norm_eps", None) is None:
        raise ValueError(
            "This Cohere2-MoE config uses layer norms (rms_norm_eps is None), which subtract a mean: "
            "rotations need RMS norms."
        )
    linearize(model)
    routers = 0
    for layer in model.model.layers:
        mlp = layer.mlp
        if type(getattr(mlp, "gate", None)).__name__ == ROUTER_CLASS:
            mlp.gate = LinearRouter(mlp.gate)
            routers += 1
    for layer in model.model.layers:
        fuse_norm_linears(layer.input_layernorm, _norm_readers(layer))
    logger.info("Prepared %d Cohere2-MoE routers and %d layers' norms for rotations", routers, len(model.model.layers))
    return model
