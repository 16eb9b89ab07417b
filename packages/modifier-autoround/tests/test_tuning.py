"""Signed gradient descent, the batch sampler, and a layer's captured calls as samples."""

from __future__ import annotations

import torch

from llmc_autoround.samples import LayerSamples
from llmc_autoround.tuning import BatchSampler, signed_gradient_descent


def test_steps_are_signed_and_decay_linearly():
    """Each step moves every parameter by exactly lr * (1 - t / iters) in the direction
    against its gradient's sign, whatever the gradient's size; ranges stay in [0, 1]."""
    offset = torch.zeros(4)
    scale = torch.ones(2)
    target = torch.tensor([3.0, -3.0, 0.001, -0.001])
    seen = []

    def loss(iteration: int) -> torch.Tensor:
        seen.append((offset.detach().clone(), scale.detach().clone()))
        return (offset - target).pow(2).sum() * 100 + (scale - 2).pow(2).sum()  # pulls scale above 1

    lr, iters = 0.1, 5
    signed_gradient_descent(loss, [offset], [scale], iters, lr)
    for t in range(1, iters):
        step = lr * (1 - (t - 1) / iters)
        moved = seen[t][0] - seen[t - 1][0]
        expected = step * torch.sign(target - seen[t - 1][0])
        torch.testing.assert_close(moved, expected)
        assert torch.equal(seen[t][1], torch.ones(2))  # clamped at 1


def test_the_best_iteration_is_kept():
    """The parameters returned are those the lowest loss was measured with, not the last."""
    p = torch.zeros(3)
    snapshots = []

    def loss(iteration: int) -> torch.Tensor:
        snapshots.append(p.detach().clone())
        # descends towards 1 for four steps, then a penalty that the gradient does not see
        bump = 0.0 if iteration < 4 else 10.0
        return (p - 1).pow(2).sum() + bump

    best, result = signed_gradient_descent(loss, [p], [], iters=10, lr=0.2)
    assert result.best_iteration == 3
    assert result.losses[3] == min(result.losses)
    assert torch.equal(best[0], snapshots[3])
    assert result.best_loss < result.initial_loss


def test_sampler_covers_every_sample_each_epoch():
    sampler = BatchSampler(10, 4, seed=3)
    drawn = torch.cat([sampler.next() for _ in range(5)])  # 20 = two epochs
    assert sorted(drawn[:8].tolist() + drawn[8:10].tolist()) == list(range(10))
    assert BatchSampler(3, 8).next() is None  # fewer samples than a batch: all of them


def _call(hidden: torch.Tensor, shared: torch.Tensor, mask=None):
    return (hidden,), {"position": shared, "flag": True}, mask


def test_samples_stack_calls_and_split_by_shape():
    """Calls of the same shapes and shared tensors stack row-wise; others form their own group;
    a subset runs as one call per group, with the rows' own per-row tensors."""
    g = torch.Generator().manual_seed(0)
    shared = torch.arange(6.0).reshape(1, 6, 1)
    a, b = torch.randn(2, 6, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    c = torch.randn(3, 5, 4, generator=g)  # another sequence length
    samples = LayerSamples([_call(a, shared), _call(b, shared.clone()), _call(c, shared[:, :5])])
    assert len(samples) == 6
    assert [grp.rows for grp in samples.groups] == [3, 3]

    def run(args, kwargs):
        assert kwargs["flag"] is True
        return args[0] * 2 + kwargs["position"]

    targets = samples.outputs(run, batch_size=2)
    torch.testing.assert_close(targets[0], torch.cat([a, b]) * 2 + shared)
    torch.testing.assert_close(targets[1], c * 2 + shared[:, :5])

    def shifted(args, kwargs):
        return run(args, kwargs) + 1.0

    subset = torch.tensor([4, 1])  # one row of each group
    error = samples.squared_error(subset, shifted, targets)
    torch.testing.assert_close(error, torch.tensor(1.0))
    calls = []
    samples.squared_error(subset, lambda x, k: calls.append(x[0]) or run(x, k), targets)
    torch.testing.assert_close(calls[0], a[1:2])
    torch.testing.assert_close(calls[1], c[1:2])


def test_loss_mask_keeps_only_masked_tokens():
    hidden = torch.zeros(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    samples = LayerSamples([((hidden,), {}, mask)])
    targets = [torch.zeros(2, 3, 4)]
    errors = torch.zeros(2, 3, 4)
    errors[:, 2] = 5.0  # only on tokens the mask drops
    errors[0, 0] = 1.0

    def run(args, kwargs):
        return args[0] + errors

    # 4 elements of value 1 over 3 kept tokens x 4 features
    torch.testing.assert_close(samples.squared_error(None, run, targets), torch.tensor(4 / 12))
