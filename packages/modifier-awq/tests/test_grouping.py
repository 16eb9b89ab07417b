"""Grouped parent calls give what the calls give one by one, and group only what lines up."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llmc_awq.grouping import grouped_calls, plan_groups


def _attention_calls(lengths: list[int]):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    attention = LlamaDecoderLayer(config, 0).self_attn.eval()
    rotary = LlamaRotaryEmbedding(config)
    calls = []
    for n in lengths:
        hidden = torch.randn(1, n, 64)
        positions = torch.arange(n)[None]
        # a fresh (equal) copy of the position embeddings per call, as AWQ's cache holds them
        kwargs = {"position_embeddings": rotary(hidden, positions), "attention_mask": None}
        calls.append(((hidden,), kwargs, None))
    return attention, calls


def test_grouped_calls_give_each_calls_output():
    attention, calls = _attention_calls([16] * 6)
    groups = plan_groups(calls, tokens_per_call=64)
    assert [g.indices for g in groups] == [[0, 1, 2, 3], [4, 5]]
    with torch.no_grad():
        alone = torch.cat([attention(*a, **k)[0] for a, k, _ in calls])
        grouped = torch.cat([attention(*a, **k)[0] for a, k, _ in grouped_calls(calls, groups, lambda v: v)])
    torch.testing.assert_close(grouped, alone, rtol=1e-5, atol=1e-6)


def test_calls_that_do_not_line_up_stay_apart():
    _, calls = _attention_calls([16, 16, 12, 16])
    assert [g.indices for g in plan_groups(calls)] == [[0, 1], [2], [3]]  # another length
    masked = [(a, k, torch.ones(1, 16)) if i == 1 else (a, k, None) for i, (a, k, _) in enumerate(calls[:2])]
    assert [g.indices for g in plan_groups(masked)] == [[0], [1]]  # a loss mask on one only
    varying = [((torch.randn(1, 4, 8), torch.tensor([i])), {}, None) for i in range(3)]
    assert [g.indices for g in plan_groups(varying)] == [[0], [1], [2]]  # a differing tensor with no batch dimension


def test_masks_are_concatenated_with_their_calls():
    calls = [((torch.randn(1, 4, 8),), {}, torch.tensor([[1, 0, 1, 1]])) for _ in range(3)]
    ((args, _, mask),) = list(grouped_calls(calls, plan_groups(calls), lambda v: v))
    assert args[0].shape == (3, 4, 8) and mask.shape == (3, 4)
    torch.testing.assert_close(args[0], torch.cat([c[0][0] for c in calls]))


class _BatchOneOnly(torch.nn.Module):
    """A parent that builds per-batch state from an argument passed once per group (here: a
    [1, n] bias it does not broadcast): grouping must not be used for it."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + bias.reshape(x.shape[0], -1, 1)


def test_a_parent_that_does_not_broadcast_is_called_batch_by_batch():
    from llmc_awq.grouping import checked_groups

    calls = [((torch.randn(1, 4, 8), torch.ones(1, 4)), {}, None) for _ in range(3)]
    planned = plan_groups(calls)
    assert [g.indices for g in planned] == [[0, 1, 2]]  # the bias is equal in every call: passed once
    parent = _BatchOneOnly()

    def run(args, kwargs, mask):
        return parent(*args, **kwargs).reshape(-1, 8)

    assert [g.indices for g in checked_groups(calls, planned, lambda v: v, run)] == [[0], [1], [2]]
    attention, attention_calls = _attention_calls([16] * 4)

    def run_attention(args, kwargs, mask):
        return attention(*args, **kwargs)[0].reshape(-1, 64)

    with torch.no_grad():
        kept = checked_groups(attention_calls, plan_groups(attention_calls), lambda v: v, run_attention)
    assert [g.indices for g in kept] == [[0, 1, 2, 3]]
