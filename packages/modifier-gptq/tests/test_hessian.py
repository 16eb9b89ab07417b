"""Hessian accumulation: exactness and sharing between modules fed the same input."""

from __future__ import annotations

import pytest
import torch

from llmc.linalg import gram
from llmc_gptq.hessian import HessianAccumulator


def test_gram_matches_float64():
    x = torch.randn(3, 50, 64, dtype=torch.bfloat16)
    ref = x.double().reshape(-1, 64).T @ x.double().reshape(-1, 64)
    torch.testing.assert_close(gram(x).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("band, stage", [(None, None), (16, 250), (24, 100)])
def test_hessian_accumulated_over_batches_matches_float64(device, band, stage, monkeypatch):
    """Several batches summed into one Hessian (in place with addmm on CUDA) equal X^T X of all:
    whole, or by upper row bands mirrored when taken (``band``, 64 not a multiple of 24 included),
    with CUDA's staged tokens multiplied when a batch overflows the stage and when taken."""
    from llmc import linalg
    from llmc_gptq import hessian

    if band is not None:
        monkeypatch.setattr(linalg, "BAND", band)
        monkeypatch.setattr(hessian, "STAGE_TOKENS", stage)
    lin = torch.nn.Linear(64, 8, device=device, dtype=torch.bfloat16)
    acc = HessianAccumulator(lambda: True)
    acc.attach(lin)
    xs = [torch.randn(2, 50, 64, dtype=torch.bfloat16, device=device) for _ in range(4)]
    for x in xs:
        lin(x)
        acc.end_batch()
    every = torch.cat([x.reshape(-1, 64) for x in xs]).double()
    result, _ = acc.pop(lin)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), every.T @ every, rtol=1e-5, atol=1e-3)
    assert torch.equal(result, result.T)


def test_modules_with_the_same_input_share_one_hessian():
    q, k, v, o = (torch.nn.Linear(16, 16) for _ in range(4))
    acc = HessianAccumulator(lambda: True)
    for m in (q, k, v, o):
        acc.attach(m)
    for _ in range(3):
        x = torch.randn(2, 5, 16)
        q(x), k(x), v(x)
        o(torch.randn(2, 5, 16))
        acc.end_batch()
    groups = sorted(len(g) for g in acc.shared_groups())
    assert groups == [1, 3]
    assert len(acc.hessians) == 2
    hq, last = acc.pop(q)
    assert not last
    assert acc.pop(k) == (hq, False) and acc.pop(v)[0] is hq
    assert acc.pop(o)[1]
    assert not acc.hessians and not acc.tokens  # freed once every sharer took it


def test_observing_flag_skips_propagation_passes():
    lin = torch.nn.Linear(8, 8)
    observing = [True]
    acc = HessianAccumulator(lambda: observing[0])
    acc.attach(lin)
    x = torch.randn(4, 8)
    lin(x)
    observing[0] = False
    lin(torch.randn(4, 8) * 100)
    torch.testing.assert_close(acc.pop(lin)[0], x.T @ x)


def test_slices_of_one_batched_input_accumulate_as_separate_inputs():
    """Each expert's down projection reads its row of one stacked tensor: the deferred batched
    product equals each module's own X^T X, and sharing by identity still works beside it."""
    experts = [torch.nn.Linear(8, 4) for _ in range(3)]
    shared = [torch.nn.Linear(8, 4) for _ in range(2)]
    acc = HessianAccumulator(lambda: True)
    for m in [*experts, *shared]:
        acc.attach(m)
    seen: dict[int, torch.Tensor] = {}
    for _ in range(2):
        stacked = torch.randn(3, 5, 8)
        for i, m in enumerate(experts):
            m(stacked[i])
            seen[i] = seen.get(i, torch.zeros(8, 8)) + stacked[i].T @ stacked[i]
        x = torch.randn(5, 8)
        shared[0](x), shared[1](x)
        seen[3] = seen.get(3, torch.zeros(8, 8)) + x.T @ x
        acc.end_batch()
    for i, m in enumerate(experts):
        hessian, last = acc.pop(m)
        assert last
        torch.testing.assert_close(hessian, seen[i])
    torch.testing.assert_close(acc.pop(shared[0])[0], seen[3])
    assert acc.pop(shared[1])[1]


def test_modules_sharing_a_hessian_stack_within_the_memory_budget(monkeypatch):
    """Shared-Hessian modules stack into matrices of at most MAX_BATCH_ELEMENTS weights."""
    from compressed_tensors.quantization import apply_quantization_config

    from llmc.quantization.config import build_config, resolve_config_groups
    from llmc_gptq import batching

    layers = torch.nn.ModuleDict({f"e{i}": torch.nn.Linear(16, 8, bias=False) for i in range(5)})
    apply_quantization_config(layers, build_config(resolve_config_groups("W8A8", None, ["Linear"]), []))
    acc = HessianAccumulator(lambda: True)
    for m in layers.values():
        acc.attach(m)
    x = torch.randn(4, 16)
    for m in layers.values():
        m(x)
    acc.end_batch()
    monkeypatch.setattr(batching, "MAX_BATCH_ELEMENTS", 2 * 16 * 8)
    solves = batching.plan_solves(list(layers.items()), acc)
    sizes = sorted(len(matrix.members) for solve in solves for matrix in solve.matrices)
    assert sizes == [1, 2, 2]
