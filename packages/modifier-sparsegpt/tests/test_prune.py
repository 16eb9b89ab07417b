"""The SparseGPT solve against a column-by-column reference, and what it must guarantee."""

from __future__ import annotations

import pytest
import torch

from llmc_sparsegpt.prune import parse_mask_structure, sparsegpt_prune_batch


def _problem(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven channel scales, as a layer's activations are
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x = x * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=g)
    return w, x.T @ x, x


def reference_prune(w, h, sparsity, n, m, block_size, damp):
    """SparseGPT without lazy batching, in float64: every column's error is applied to every
    later column at once; masks are chosen where the paper chooses them (per block, or at each
    group of M columns) from the weights as updated so far."""
    W, H = w.double().clone(), h.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = torch.diag(U)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if n == 0 and j % block_size == 0:
            block = slice(j, min(j + block_size, cols))
            score = W[:, block] ** 2 / d[block] ** 2
            threshold = score.flatten().sort().values[int(score.numel() * sparsity)]
            mask[:, block] = score <= threshold
        if n and j % m == 0:
            score = W[:, j : j + m] ** 2 / d[j : j + m] ** 2
            smallest = score.topk(n, dim=1, largest=False).indices
            mask[:, j : j + m].scatter_(1, smallest, True)
        w_j = W[:, j].clone()
        q = torch.where(mask[:, j], torch.zeros_like(w_j), w_j)
        W[:, j:] -= torch.outer((w_j - q) / U[j, j], U[j, j:])
        W[:, j] = q
    return W.float()


def output_error(w, p, x):
    return float(((x @ w.T - x @ p.T) ** 2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize("mask_structure, sparsity, block_size", [("2:4", 0.5, 16), ("0:0", 0.5, 16), ("0:0", 0.7, 64), ("1:4", 0.25, 8)])
def test_matches_the_column_by_column_reference(mask_structure, sparsity, block_size):
    w, h, x = _problem()
    n, m = parse_mask_structure(mask_structure)
    result = sparsegpt_prune_batch(w[None], h[None], sparsity, n, m, block_size=block_size)[0]
    expected = reference_prune(w, h, sparsity, n, m, block_size, 0.01)
    assert torch.equal(result.weight == 0, expected == 0)
    torch.testing.assert_close(result.weight, expected, atol=2e-4, rtol=1e-4)
    assert result.relative_error == pytest.approx(output_error(w, result.weight, x), rel=1e-3)


def test_two_of_four_structure_and_better_than_magnitude():
    w, h, x = _problem(rows=64, cols=128)
    result = sparsegpt_prune_batch(w[None], h[None], 0.5, 2, 4)[0]
    groups = (result.weight == 0).reshape(64, -1, 4).sum(dim=-1)
    assert bool((groups == 2).all())  # exactly two of every four (random weights have no zeros)
    assert result.sparsity == 0.5
    # magnitude 2:4 on the same weights: drop the two smallest |w| of each group, no update
    magnitude = w.reshape(64, -1, 4)
    keep = magnitude.abs().topk(2, dim=-1).indices
    pruned = torch.zeros_like(magnitude).scatter(-1, keep, magnitude.gather(-1, keep)).reshape(64, 128)
    assert output_error(w, result.weight, x) < 0.85 * output_error(w, pruned, x)


def test_unstructured_reaches_its_sparsity_per_block():
    w, h, _ = _problem(rows=32, cols=96)
    result = sparsegpt_prune_batch(w[None], h[None], 0.6, block_size=32)[0]
    for start in range(0, 96, 32):
        zeros = float((result.weight[:, start : start + 32] == 0).float().mean())
        assert zeros == pytest.approx(0.6, abs=1 / (32 * 32) + 1e-6)


def test_a_batch_equals_its_matrices_one_by_one_each_with_its_sparsity():
    problems = [_problem(seed=s) for s in range(3)]
    weights = torch.stack([p[0] for p in problems])
    hessians = torch.stack([p[1] for p in problems])
    batched = sparsegpt_prune_batch(weights, hessians, torch.tensor([0.3, 0.5, 0.8]), block_size=32)
    for (w, h, _), sparsity, result in zip(problems, [0.3, 0.5, 0.8], batched, strict=True):
        alone = sparsegpt_prune_batch(w[None], h[None], sparsity, block_size=32)[0]
        torch.testing.assert_close(result.weight, alone.weight)


def test_dead_inputs_are_zeroed_and_a_consumed_hessian_is_freed():
    w, h, _ = _problem()
    h[:, 5] = 0
    h[5, :] = 0
    holder = [h.clone()[None]]
    result = sparsegpt_prune_batch(w[None], holder, 0.5, 2, 4)[0]
    assert holder == []
    assert bool((result.weight[:, 5] == 0).all())
    assert bool((torch.isfinite(result.weight)).all())


def test_preserve_sparsity_mask_keeps_existing_zeros_and_refuses_a_lower_target():
    w, h, x = _problem(rows=32, cols=64)
    start = sparsegpt_prune_batch(w[None], h[None], 0.3, block_size=16)[0].weight
    result = sparsegpt_prune_batch(start[None], h[None], 0.6, block_size=16, preserve_sparsity_mask=True)[0]
    assert bool((result.weight[start == 0] == 0).all())
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    two_of_four = sparsegpt_prune_batch(start[None], h[None], 0.5, 2, 4, preserve_sparsity_mask=True)[0].weight
    assert bool((two_of_four[start == 0] == 0).all())
    assert bool(((two_of_four == 0).reshape(32, -1, 4).sum(-1) >= 2).all())
    with pytest.raises(ValueError, match="already .* sparse"):
        sparsegpt_prune_batch(start[None], h[None], 0.1, preserve_sparsity_mask=True)


def test_keeps_dtype_and_bfloat16_weights():
    w, h, _ = _problem()
    result = sparsegpt_prune_batch(w.to(torch.bfloat16)[None], h[None], 0.5, 2, 4)[0]
    assert result.weight.dtype == torch.bfloat16
    assert bool(((result.weight == 0).reshape(48, -1, 4).sum(-1) >= 2).all())


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b"])
def test_bad_mask_structures_are_refused(bad):
    with pytest.raises(ValueError, match="mask_structure"):
        parse_mask_structure(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w, h, _ = _problem(rows=64, cols=256)
    cpu = sparsegpt_prune_batch(w[None], h[None], 0.5, 2, 4)[0]
    gpu = sparsegpt_prune_batch(w.cuda()[None], h.cuda()[None], 0.5, 2, 4)[0]
    assert float((cpu.weight == 0).eq(gpu.weight.cpu() == 0).float().mean()) > 0.99
    assert gpu.relative_error == pytest.approx(cpu.relative_error, rel=0.05)
