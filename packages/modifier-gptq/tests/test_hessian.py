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
    hq = acc.pop(q)
    assert acc.pop(k) is hq and acc.pop(v) is hq
    assert len(acc.hessians) == 1  # freed once all three took it
    assert list(acc.tokens.values()) == [30]  # o_proj's: 2 x 5 tokens, 3 batches


def test_observing_flag_skips_propagation_passes():
    lin = torch.nn.Linear(8, 8)
    observing = [True]
    acc = HessianAccumulator(lambda: observing[0])
    acc.attach(lin)
    x = torch.randn(4, 8)
    lin(x)
    observing[0] = False
    lin(torch.randn(4, 8) * 100)
    torch.testing.assert_close(acc.pop(lin), x.T @ x)
