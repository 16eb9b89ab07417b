"""Hessian accumulation: exactness and sharing between modules fed the same input."""

from __future__ import annotations

import torch

from llmc_gptq.hessian import HessianAccumulator, gram


def test_gram_matches_float64():
    x = torch.randn(3, 50, 64, dtype=torch.bfloat16)
    ref = x.double().reshape(-1, 64).T @ x.double().reshape(-1, 64)
    torch.testing.assert_close(gram(x).double(), ref, rtol=1e-5, atol=1e-4)


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
