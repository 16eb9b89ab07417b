# Written by `python -m llmc.args` from llmc/args.py; tests/test_cli.py checks it is current.
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme

from llmc.model_free import Summary

__version__: str
__all__: list[str]


def oneshot(
    *,
    model: Any,
    tokenizer: Any = None,
    processor: Any = None,
    config_name: str | None = None,
    precision: str = 'auto',
    trust_remote_code_model: bool = False,
    save_compressed: bool = True,
    model_revision: str = 'main',
    tie_word_embeddings: bool = False,
    allow_unquantized_fused_weights: bool = False,
    recipe: Any = None,
    recipe_args: list[str] | dict[str, Any] | None = None,
    stage: str | None = None,
    allow_unmatched_targets: bool = False,
    dataset: Any = None,
    dataset_config_name: str | None = None,
    dataset_path: str | None = None,
    splits: str | None = None,
    num_calibration_samples: int = 512,
    max_seq_length: int = 384,
    batch_size: int = 1,
    data_collator: str | Callable[..., Any] = 'truncation',
    shuffle_calibration_samples: bool = True,
    seed: int = 42,
    text_column: str = 'text',
    concatenate_data: bool = False,
    streaming: bool = False,
    preprocessing_num_workers: int | None = None,
    dataloader_num_workers: int = 0,
    pad_to_max_length: bool = True,
    moe_calibrate_all_experts: bool = True,
    preprocessing_func: Callable[..., Any] | None = None,
    remove_columns: list[str] | None = None,
    overwrite_cache: bool = False,
    min_tokens_per_module: float | None = None,
    use_loss_mask: bool = False,
    pipeline: str | None = 'independent',
    sequential_targets: list[str] | None = None,
    sequential_offload_device: str = 'cpu',
    quantization_aware_calibration: bool = True,
    propagate_error: bool | None = None,
    tracing_ignore: list[str] | None = None,
    sequential_targets_per_subgraph: int = 1,
    sequential_prefetch: bool = False,
    device: str | None = None,
    output_dir: str | None = None,
    log_dir: str | None = None,
    overwrite_output_dir: bool = False,
    saver: str = 'compressed-tensors',
    quantization_format: str | None = None,
    clear_sparse_session: bool = False,
    resume: bool = True,
    resume_interval: float = 60.0,
) -> Any:
    """Load a model, run a recipe of modifiers over calibration data, save the result.

llm-compressor 0.14's oneshot arguments, in its groups; every argument is keyword-only.
Returns the compressed model (also saved in compressed-tensors format when output_dir is set).

ModelArguments:
    model: Hugging Face model ID, local path, or a loaded PreTrainedModel
    tokenizer: Tokenizer ID or path, or a loaded tokenizer; inferred from the model if not set
    processor: Processor ID or path (multimodal); inferred from the model if not set
    config_name: Config name or path if different from the model
    precision: Dtype to load weights in: auto, float32, float16, bfloat16
    trust_remote_code_model: Allow custom model code from the repository
    save_compressed: Save weights in compressed format (False: dense fake-quantized weights)
    model_revision: Model version: branch, tag or commit
    tie_word_embeddings: Keep tied input and output embeddings tied when the recipe leaves lm_head unquantized (False: always untie)
    allow_unquantized_fused_weights: Proceed when fused 3-D weights (MoE experts) that no installed patch linearizes would stay unquantized
RecipeArguments:
    recipe: Recipe: YAML path or string, a modifier, or a list of modifiers
    recipe_args: Recipe overrides as key=value
    stage: Run only this recipe stage
    allow_unmatched_targets: Run a quantizing modifier whose targets select no module of the model (it then quantizes nothing) instead of refusing
DatasetArguments:
    dataset: Registered dataset name, a datasets.Dataset/DatasetDict, or a torch DataLoader
    dataset_config_name: Dataset configuration name
    dataset_path: Local JSON, JSONL or CSV file (or folder) to calibrate on
    splits: Dataset split to calibrate on (default: calibration/train)
    num_calibration_samples: Number of calibration samples
    max_seq_length: Tokens per sample after truncation
    batch_size: Calibration batch size
    data_collator: 'truncation' (cut a batch to its shortest sample), 'padding', or a callable
    shuffle_calibration_samples: Shuffle before selecting samples (seeded)
    seed: Seed for shuffling calibration samples
    text_column: Dataset column holding the text
    concatenate_data: Concatenate samples to fill max_seq_length
    streaming: Stream the dataset instead of downloading it whole
    preprocessing_num_workers: Workers for dataset preprocessing
    dataloader_num_workers: Workers for the calibration DataLoader
    pad_to_max_length: Pad every sample to max_seq_length
    moe_calibrate_all_experts: Route all tokens through all MoE experts during calibration
    preprocessing_func: Function applied to every dataset row (datasets.map) before tokenization
    remove_columns: Dataset columns to drop after preprocessing
    overwrite_cache: Accepted for llm-compressor scripts; llmc keeps no dataset cache of its own
    min_tokens_per_module: Warn when a module receives less than this fraction of tokens
    use_loss_mask: Only tokens whose 'loss_mask' (a tokenized dataset's column) is 1 count in AWQ's statistics and loss
PipelineArguments:
    pipeline: Calibration pipeline: independent, basic, sequential, datafree
    sequential_targets: Module classes or names calibrated one at a time by the sequential pipeline
    sequential_offload_device: Where cached activations live between sequential layers
    quantization_aware_calibration: Feed quantized layer outputs to the next layer in the sequential pipeline
    propagate_error: llm-compressor's name for quantization_aware_calibration; overrides it when given
    tracing_ignore: Accepted for llm-compressor scripts; llmc's sequential pipeline traces nothing
    sequential_targets_per_subgraph: Accepted for llm-compressor scripts; llmc calibrates one target at a time
    sequential_prefetch: Prefetch the next batch in a background thread
    device: Execution device (default: cuda if available, else cpu)
OutputArguments:
    output_dir: Directory to save the compressed model; nothing is saved if unset
    log_dir: Directory for timestamped log files
    overwrite_output_dir: Replace a non-empty output_dir
    saver: Registered saver that writes the checkpoint
    quantization_format: compressed-tensors format for every quantized module (default: inferred per scheme)
    clear_sparse_session: Accepted for llm-compressor scripts; llmc keeps no session between calls
    resume: Keep the sequential pipeline's progress beside output_dir, so that the same command after a crash continues from the last saved layer
    resume_interval: Seconds between saves of that progress (never more than a tenth of the run's time); 0: after every layer
"""


def model_free_ptq(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    scheme: QuantizationScheme | str,
    ignore: Iterable[str] = (),
    max_workers: int = 1,
    device: torch.device | str | None = None,
    converter: Any = None,
) -> Summary:
    """Quantize a safetensors checkpoint without building the model."""


def reindex_fused_weights(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    num_workers: int = 5,
) -> Summary:
    """Rewrite a checkpoint so the weights that share an NVFP4 global scale share a shard."""
