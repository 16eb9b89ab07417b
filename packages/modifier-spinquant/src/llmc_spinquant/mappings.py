"""Where SpinQuant's rotations go in a decoder model, and which norms feed which Linears.

The defaults name the modules of Llama-style decoders (Llama, Mistral, Qwen2/3, ...):
regular expressions in compressed-tensors' ``re:`` form. A recipe may give its own
(``mappings``, ``norm_mappings``), as in llm-compressor 0.14.
"""

from __future__ import annotations

from typing import Any

import attrs

from llmc.quantization.config import as_list


@attrs.frozen(kw_only=True)
class SpinQuantMapping:
    """The modules each rotation touches: R1 the residual stream (what writes it, what reads
    it), R2 the values and the attention output per head, R3 queries and keys, R4 the MLP
    output's input."""

    embedding: str
    attn: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_o: str
    mlp_in: list[str] = attrs.field(converter=as_list)
    mlp_out: list[str] = attrs.field(converter=as_list)
    lm_head: str
    attn_head_dim: int | None = None


@attrs.frozen(kw_only=True)
class NormMapping:
    """A norm and the Linears it feeds: its scale is folded into them before rotating."""

    norm: str
    linears: list[str] = attrs.field(converter=as_list)


DEFAULT = SpinQuantMapping(
    embedding="re:.*embed_tokens$",
    attn="re:.*self_attn$",
    attn_q="re:.*q_proj$",
    attn_k="re:.*k_proj$",
    attn_v="re:.*v_proj$",
    attn_o="re:.*o_proj$",
    mlp_in=["re:.*up_proj$", "re:.*gate_proj$"],
    mlp_out="re:.*down_proj$",
    lm_head="lm_head",
)

DEFAULT_NORMS = [
    NormMapping(norm="re:.*input_layernorm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]),
    NormMapping(norm="re:.*post_attention_layernorm$", linears=["re:.*up_proj$", "re:.*gate_proj$"]),
    NormMapping(norm="model.norm", linears=["lm_head"]),
]


def as_mapping(value: Any) -> SpinQuantMapping | None:
    return value if value is None or isinstance(value, SpinQuantMapping) else SpinQuantMapping(**value)


def as_norm_mappings(value: Any) -> list[NormMapping] | None:
    if value is None:
        return None
    return [v if isinstance(v, NormMapping) else NormMapping(**v) for v in value]


# Cohere2-MoE (after llmc.modeling.moe.cohere2_moe.prepare_cohere2_moe_for_spinquant): one norm
# feeds attention, experts and router in parallel; the router's Linear reads the residual stream
_COHERE2_MOE_IN = ["re:.*gate_proj$", "re:.*up_proj$", r"re:.*mlp\.gate\.linear$"]
COHERE2_MOE = attrs.evolve(DEFAULT, mlp_in=_COHERE2_MOE_IN)
COHERE2_MOE_NORMS = [
    NormMapping(norm="re:.*input_layernorm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$", *_COHERE2_MOE_IN]),
    NormMapping(norm="model.norm", linears=["lm_head"]),
]

# architecture -> its mappings and norm mappings, where they are not the defaults (0.14's registry)
BY_ARCHITECTURE: dict[str, tuple[SpinQuantMapping, list[NormMapping]]] = {
    "Cohere2MoeForCausalLM": (COHERE2_MOE, COHERE2_MOE_NORMS),
}


def for_model(model: Any) -> tuple[SpinQuantMapping, list[NormMapping]]:
    """The default mappings and norm mappings of ``model``'s architecture."""
    return BY_ARCHITECTURE.get(type(model).__name__, (DEFAULT, DEFAULT_NORMS))
