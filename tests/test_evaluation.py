"""llmc.evaluation.compare, which computes every perplexity, KL and top-1 figure the benchmarks
publish, against the definitions written out position by position in float64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llmc.evaluation import compare


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits for a batch of ids are a fixed function of the ids."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (vocab, vocab): logits after each token
        self.device = torch.device("cpu")

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[ids])


def _by_definition(reference: torch.Tensor, model: torch.Tensor, batches: list[torch.Tensor]) -> dict[str, float]:
    nll_ref = nll = kl = agree = 0.0
    count = 0
    for ids in batches:
        row = ids[0].tolist()
        for position in range(len(row) - 1):
            token, target = row[position], row[position + 1]
            p = torch.softmax(reference[token].double(), -1)
            q = torch.softmax(model[token].double(), -1)
            nll_ref -= math.log(p[target])
            nll -= math.log(q[target])
            kl += float(sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p))))
            agree += int(torch.argmax(p) == torch.argmax(q))
            count += 1
    return {"perplexity_reference": math.exp(nll_ref / count), "perplexity": math.exp(nll / count),
            "kl_divergence": kl / count, "top1_agreement": agree / count, "tokens": count}


def test_compare_matches_the_definitions():
    g = torch.Generator().manual_seed(0)
    vocab = 12
    reference = torch.randn(vocab, vocab, generator=g) * 3
    model = reference + torch.randn(vocab, vocab, generator=g)  # close, not equal: some top-1 differ
    batches = [torch.randint(0, vocab, (1, 9), generator=g) for _ in range(4)]
    got = compare(FixedLogits(reference), FixedLogits(model), batches)
    expected = _by_definition(reference, model, batches)
    assert 0 < expected["top1_agreement"] < 1 and expected["kl_divergence"] > 0
    for key, value in expected.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-5), key


def test_identical_models_agree_fully():
    table = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    got = compare(FixedLogits(table), FixedLogits(table.clone()), [torch.tensor([[1, 2, 3, 4, 5]])])
    assert got.kl_divergence == pytest.approx(0, abs=1e-7) and got.top1_agreement == 1
    assert got.perplexity == pytest.approx(got.perplexity_reference)
