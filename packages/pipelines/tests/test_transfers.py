"""Activation transfers: repeated layer arguments stay resident, within a budget."""

from __future__ import annotations

import torch

from llmc_pipelines.transfers import Transfers, map_tensors


def test_equal_arguments_are_kept_once_on_the_execution_device():
    transfers = Transfers(torch.device("cpu"), torch.device("meta"))  # "meta" stands in for an offload device
    rotary = (torch.arange(6.0).reshape(2, 3), torch.ones(2, 3))
    same_values = (rotary[0].clone(), rotary[1].clone())  # a later batch: new objects, equal values
    first = transfers.arguments_to_offload({"position_embeddings": rotary}, {})
    second = transfers.arguments_to_offload({"position_embeddings": same_values}, {})
    assert first["position_embeddings"][0] is second["position_embeddings"][0]
    assert len(transfers.resident) == 2


def test_budget_sends_the_rest_to_the_offload_device():
    transfers = Transfers(torch.device("cpu"), torch.device("meta"))
    transfers.RESIDENT_TENSORS = 1
    kept = transfers.arguments_to_offload(torch.zeros(4), {})
    other = transfers.arguments_to_offload(torch.ones(4), {})
    assert kept.device.type == "cpu" and other.device.type == "meta"


def test_map_tensors_keeps_structure():
    value = {"a": (torch.zeros(1), [torch.ones(1), 3]), "b": None}
    out = map_tensors(value, lambda t: t + 1)
    assert out["a"][0].item() == 1 and out["a"][1][0].item() == 2 and out["a"][1][1] == 3 and out["b"] is None
