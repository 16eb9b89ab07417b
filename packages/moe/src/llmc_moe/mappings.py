"""Default smooth/balance mappings of the MoE families, registered through
``llmc_register_mappings`` like any model plugin's.

After the attention norm, an MoE layer's norm feeds every expert's gate and up
projections, the shared experts' and the router (whose weights must be scaled
too, or the routing would change; it is balanced, not quantized). AWQ also
balances each expert's up projection against its down projection, where the
expert's activation is ``act(gate) * up`` (linear in up; not gpt-oss, whose up is
clamped).
"""

from __future__ import annotations

from llmc.api import Mapping

# (SmoothQuant's mappings, AWQ's) of one architecture
AlgorithmMappings = tuple[list[Mapping], list[Mapping]]

_ROUTERS = r"gate|router|shared_expert_gate"
_GATE_UP = r"(gate_proj|up_proj|w1|w3)"


def _attention(q: str = r"(q|k|v)_proj") -> Mapping:
    return Mapping("re:.*input_layernorm$", [f"re:.*self_attn\\.{q}$"])


def _moe_inputs(block: str) -> Mapping:
    return Mapping(
        "re:.*post_attention_layernorm$",
        [
            f"re:.*{block}\\.{_GATE_UP}$",  # dense layers of the same model (DeepSeek's first)
            f"re:.*{block}\\.experts\\.\\d+\\.{_GATE_UP}$",
            f"re:.*{block}\\.shared_experts?\\.{_GATE_UP}$",
            f"re:.*{block}\\.({_ROUTERS})$",
        ],
    )


def _up_down() -> Mapping:
    return Mapping(r"re:.*(up_proj|w3)$", [r"re:.*(down_proj|w2)$"])


def moe_mappings(
    block: str = "mlp", attention: Mapping | None = None, extra_awq: tuple[Mapping, ...] = (), up_down: bool = True
) -> AlgorithmMappings:
    attention = attention or _attention()
    smoothquant = [attention, _moe_inputs(block)]
    awq = [attention, *extra_awq, Mapping("re:.*v_proj$", ["re:.*o_proj$"]), _moe_inputs(block)]
    if up_down:
        awq.append(_up_down())
    return smoothquant, awq


def builtin_moe_mappings() -> dict[str, AlgorithmMappings]:
    standard = moe_mappings()
    # Qwen3-Next and Qwen3.5: the attention norm feeds full attention's q/k/v or, in linear
    # attention layers, the linear attention's input projections
    hybrid = moe_mappings(attention=Mapping(
        "re:.*input_layernorm$", [r"re:.*self_attn\.(q|k|v)_proj$", r"re:.*linear_attn\.in_proj_\w+$"]
    ))
    # Cohere2-MoE: one norm feeds the attention and the MoE block in parallel
    parallel_inputs = Mapping(
        "re:.*input_layernorm$",
        [r"re:.*self_attn\.(q|k|v)_proj$", *_moe_inputs("mlp").balance_layers],
    )
    parallel = ([parallel_inputs], [parallel_inputs, Mapping("re:.*v_proj$", ["re:.*o_proj$"]), _up_down()])
    deepseek_attention = _attention(r"(q_proj|q_a_proj|kv_a_proj_with_mqa)")
    deepseek = (
        [deepseek_attention, _moe_inputs("mlp")],
        [
            deepseek_attention,
            Mapping("re:.*q_a_layernorm$", ["re:.*q_b_proj$"]),
            Mapping("re:.*kv_a_layernorm$", ["re:.*kv_b_proj$"]),
            _moe_inputs("mlp"),
            _up_down(),
        ],
    )
    return {
        "MixtralForCausalLM": standard,
        "Qwen2MoeForCausalLM": standard,
        "Qwen3MoeForCausalLM": standard,
        "OlmoeForCausalLM": standard,
        "Glm4MoeForCausalLM": standard,
        "PhimoeForCausalLM": standard,
        "GraniteMoeForCausalLM": moe_mappings(block="block_sparse_moe"),
        "Llama4ForCausalLM": moe_mappings(block="feed_forward"),
        "GptOssForCausalLM": moe_mappings(up_down=False),
        "DeepseekV2ForCausalLM": deepseek,
        "DeepseekV3ForCausalLM": deepseek,
        "MiniMaxM2ForCausalLM": standard,
        "Qwen3NextForCausalLM": hybrid,
        "Qwen3_5MoeForCausalLM": hybrid,
        "Cohere2MoeForCausalLM": parallel,
    }
