"""Small models and tokenizers built locally, deterministically, with no download.

The demo, the tests and the benchmarks all start from these: a byte-level BPE
tokenizer trained on the offline corpus, and a decoder built from a
transformers config of a chosen architecture.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from llmc.data import corpus

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# Architecture name -> (config class, extra config fields).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),
    # linear and full attention layers, norms that scale by 1 + weight (transformers 5.2x)
    "qwen3_5": ("Qwen3_5TextConfig", {"layer_types": ["linear_attention", "full_attention"]}),
    # MoE families (fused experts, as transformers 5 holds them): four experts, two per token
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # multi-head latent attention: as many key/value heads as query heads, rotary on 16 dims
    "deepseek_v3": ("DeepseekV3Config", {
        "num_key_value_heads": 4, "head_dim": 16, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 128, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
    }),
    "glm4_moe": ("Glm4MoeConfig", {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "first_k_dense_replace": 1,
    }),
    # newer MoE families (transformers 5.2x): linear and full attention layers, DSA indexers
    "qwen3_next": ("Qwen3NextConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 128, "layer_types": ["linear_attention", "full_attention"],
    }),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 128, "layer_types": ["linear_attention", "full_attention"],
    }),
    "minimax_m2": ("MiniMaxM2Config", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "cohere2_moe": ("Cohere2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128}),
    # compressed and sparse attention, hyper-connections, a hash-routed MoE layer then a learned one
    "deepseek_v4": ("DeepseekV4Config", {
        "num_key_value_heads": 1, "head_dim": 64, "q_lora_rank": 128, "o_lora_rank": 128, "o_groups": 2,
        "qk_rope_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "n_shared_experts": 1, "index_n_heads": 2, "index_head_dim": 64, "index_topk": 8, "sliding_window": 16,
        "layer_types": ["heavily_compressed_attention", "compressed_sparse_attention"],
        "mlp_layer_types": ["hash_moe", "moe"], "num_nextn_predict_layers": 0,
    }),
    "glm_moe_dsa": ("GlmMoeDsaConfig", {
        "num_key_value_heads": 4, "head_dim": 16, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16, "v_head_dim": 32, "index_head_dim": 32, "index_n_heads": 2, "index_topk": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1,
    }),
}


@functools.cache
def _trained_tokenizer_json(vocab_size: int, corpus_name: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.split_texts(corpus.CALIBRATION, corpus_name), trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 2048, corpus_name: str = corpus.NAME) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the calibration part of an offline corpus."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, corpus_name))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **SPECIAL_TOKENS)


_TEXT_SIZES = dict(
    vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def _text_fields(**given: Any) -> dict[str, Any]:
    """The config fields every tiny decoder shares: the sizes (``given`` or the defaults) and
    what follows from them."""
    sizes = {k: given.get(k, v) for k, v in _TEXT_SIZES.items()}
    return dict(
        sizes,
        head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def build_config(arch: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny config of family ``arch``: two layers of width 128 unless ``overrides`` say otherwise."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}.")
    cls_name, extra = ARCHITECTURES[arch]
    fields = _text_fields(**overrides)
    fields.update(extra)  # a family's own fields, then the caller's, may replace the defaults
    fields.update(overrides)
    return getattr(transformers, cls_name)(**fields)


def build_model(config: transformers.PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM, identical for the same config and seed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


# vision-language families: config class, the text model's fields beyond build_config's, the vision tower's
_LINEAR_ATTENTION = {
    "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 32, "linear_value_head_dim": 32,
}
_QWEN_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                "patch_size": 16}
_GEMMA4_TEXT = {"vocab_size_per_layer_input": 2048, "layer_types": ["sliding_attention", "full_attention"]}
_GEMMA4_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "position_embedding_size": 256}
VISION_LANGUAGE: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "qwen3_5_vl": ("Qwen3_5Config", _LINEAR_ATTENTION, _QWEN_VISION),
    "qwen3_5_moe_vl": ("Qwen3_5MoeConfig", {
        **_LINEAR_ATTENTION, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 128,
    }, _QWEN_VISION),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
    }, {**_QWEN_VISION, "deepstack_visual_indexes": [1]}),
    # Llama 4 (Scout): routed and shared experts in every layer, a dense MLP nowhere
    "llama4_vl": ("Llama4Config", {
        "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 256, "attention_chunk_size": 64,
    }, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": 56, "patch_size": 14, "vision_output_dim": 128, "projector_input_dim": 128,
        "projector_output_dim": 128}),
    "gemma4_vl": ("Gemma4Config", _GEMMA4_TEXT, _GEMMA4_VISION),
    # Gemma 4's MoE (26B-A4B): a dense MLP and routed experts side by side in every layer
    "gemma4_moe_vl": ("Gemma4Config", {
        **_GEMMA4_TEXT, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 128,
    }, _GEMMA4_VISION),
}


def build_vision_language(arch: str, seed: int = 0, **text: Any) -> PreTrainedModel:
    """A randomly initialised vision-language model (``AutoModelForImageTextToText``): the text
    model as :func:`build_config` makes one, beside a small vision tower."""
    if arch not in VISION_LANGUAGE:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(VISION_LANGUAGE)}.")
    cls_name, extra, vision = VISION_LANGUAGE[arch]
    fields = {**_text_fields(), **extra, **text}
    config = getattr(transformers, cls_name)(text_config=fields, vision_config=vision)
    torch.manual_seed(seed)
    return transformers.AutoModelForImageTextToText.from_config(config).eval()


def save_tiny(path: str | Path, arch: str = "llama", seed: int = 0, **config: Any) -> Path:
    """Build a tokenizer and model and save both as a normal checkpoint at ``path``."""
    tokenizer = build_tokenizer(config.get("vocab_size", 2048))
    model = build_model(build_config(arch, **config), seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def corpus_token_ids(
    tokenizer: PreTrainedTokenizerFast, split: str = corpus.CALIBRATION, corpus_name: str = corpus.NAME
) -> torch.Tensor:
    """The whole corpus split as one stream of token ids."""
    ids: list[int] = []
    for text in corpus.split_texts(split, corpus_name):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    steps: int = 200,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    corpus_name: str = corpus.NAME,
) -> list[float]:
    """Train ``model`` as a language model on the calibration split; returns the losses.

    Deterministic for a given seed, device and thread count. On CUDA the forward runs
    under bfloat16 autocast (weights stay float32).
    """
    from tqdm.auto import tqdm

    stream = corpus_token_ids(tokenizer, corpus.CALIBRATION, corpus_name)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in tqdm(range(steps), desc="Training", disable=not progress):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.is_cuda)
        with autocast:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
