"""Output agreement of a compressed model with its original, on held-out text."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

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


def load_decompressed(
    checkpoint: str | Path, dtype: torch.dtype = torch.bfloat16, via_transformers: bool = True
) -> torch.nn.Module:
    """A compressed-tensors checkpoint as a dense model, decompressed by compressed-tensors itself.

    transformers' own loader is tried first; some versions cannot reload asymmetric
    pack-quantized checkpoints (zero points), and none reloads per-expert tensors into
    experts it holds fused without a conversion for them (gpt-oss, Llama 4): on failure,
    or when it leaves any tensor unused or unloaded, each quantized module's tensors go
    through the format's decompressor into a model built from the config, with the
    installed model patches applied as ``oneshot`` applies them (linearized experts).
    ``via_transformers=False`` goes straight to the decompressor.
    """
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_named_modules
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from llmc.model_loading import build_saved, saved_class
    from llmc.patches import matching_patches
    from llmc.quantization.attention import apply_attention_scheme
    from llmc.quantization.kv_cache import apply_kv_cache_scheme, attention_modules

    model_config = AutoConfig.from_pretrained(checkpoint)
    if via_transformers:
        try:
            model, info = saved_class(model_config).from_pretrained(checkpoint, dtype=dtype, output_loading_info=True)
            if not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
                return model.eval()
        except RuntimeError:
            pass
    checkpoint = Path(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    config = QuantizationConfig.model_validate(raw["quantization_config"])
    del model_config.quantization_config
    model = build_saved(model_config, dtype=dtype).eval()
    for patch in matching_patches(model):
        patch.apply(model)
    transforms = raw["quantization_config"].get("transform_config")
    if transforms:  # rotations (QuIP): online transforms attached; their weights load below
        from compressed_tensors.transform import TransformConfig, apply_transform_config

        apply_transform_config(model, TransformConfig.model_validate(transforms))
    if config.kv_cache_scheme is not None:  # k/v scales to load, and keys and values quantized as served
        apply_kv_cache_scheme(model, config.kv_cache_scheme)
    attention = dict(attention_modules(model))
    for scheme in config.config_groups.values():  # attention groups: q scales too, queries quantized
        modules = [(n, m) for n, m in match_named_modules(model, scheme.targets, config.ignore) if n in attention]
        if scheme.weights is None and modules:
            apply_attention_scheme(model, modules, scheme)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for scheme in config.config_groups.values():
        if scheme.weights is None:  # activations only: their scales load as they are
            continue
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        for name, _ in match_named_modules(model, scheme.targets, config.ignore):
            prefix = name + "."
            # the module's own tensors (a submodule's, such as a transform's weight, load as they are)
            own = [k for k in tensors if k.startswith(prefix) and "." not in k.removeprefix(prefix)]
            state = {k.removeprefix(prefix): tensors.pop(k) for k in own}
            tensors[prefix + "weight"] = compressor.decompress(state, scheme)["weight"]
            if "bias" in state:  # stored as is
                tensors[prefix + "bias"] = state["bias"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # a parameter shared by several modules (one transform for every Linear) is stored once
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(parameters[k]) for k in tensors if k in parameters}
    missing = [m for m in missing if m not in parameters or id(parameters[m]) not in loaded]
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(f"{checkpoint}: could not map tensors: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    return model.to(dtype)
