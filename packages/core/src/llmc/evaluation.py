"""Output agreement of a compressed model with its original, on held-out text."""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs
import torch
import torch.nn.functional as F


@attrs.frozen
class Agreement:
    perplexity_reference: float
    perplexity: float
    kl_divergence: float  # mean KL(reference || model) per next-token distribution, nats
    top1_agreement: float  # fraction of positions whose argmax tokens agree
    tokens: int


def eval_batches(tokenizer, texts: Iterable[str], seq_len: int = 256, max_batches: int = 16) -> list[torch.Tensor]:
    """Concatenate ``texts`` and cut them into (1, seq_len) rows of token ids."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return [torch.tensor([r]) for r in rows[:max_batches]]


@torch.no_grad()
def compare(reference: torch.nn.Module, model: torch.nn.Module, batches: list[torch.Tensor]) -> Agreement:
    nll_ref = nll = kl = agree = 0.0
    count = 0
    for ids in batches:
        ref_logits = reference(ids.to(reference.device), use_cache=False).logits[:, :-1].float().cpu()
        logits = model(ids.to(model.device), use_cache=False).logits[:, :-1].float().cpu()
        target = ids[:, 1:]
        ref_logp, logp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
        nll_ref += F.nll_loss(ref_logp.flatten(0, 1), target.flatten(), reduction="sum").item()
        nll += F.nll_loss(logp.flatten(0, 1), target.flatten(), reduction="sum").item()
        kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        agree += (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()
        count += target.numel()
    return Agreement(
        perplexity_reference=math.exp(nll_ref / count),
        perplexity=math.exp(nll / count),
        kl_divergence=kl / count,
        top1_agreement=agree / count,
        tokens=count,
    )


def weights_size(checkpoint) -> int:
    """Bytes of the checkpoint's safetensors weight files."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
