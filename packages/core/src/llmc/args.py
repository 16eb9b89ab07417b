"""oneshot's arguments, in llm-compressor's names, defaults and groups.

Each group is an attrs class validated on construction; :func:`parse_oneshot_args`
splits a flat keyword set into the groups and names any unknown keyword along
with the closest valid one. The CLI builds its options from the same fields.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import attrs
from attrs import validators as v

PRECISIONS = ("auto", "float32", "float16", "bfloat16", "float", "half", "bf16", "fp16", "fp32")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _positive(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value}.")


def _str_list(value: Any) -> list[str] | None:
    """None keeps its meaning (the model's default); anything else becomes a list."""
    from llmc.quantization.config import as_list

    return None if value is None else as_list(value)


def _collator(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (callable(value) or value in ("truncation", "padding")):
        raise ValueError(
            f"data_collator must be 'truncation', 'padding' or a callable, got {value!r}."
        )


@attrs.define(kw_only=True)
class ModelArguments:
    model: Any = attrs.field(metadata=_help("Hugging Face model ID, local path, or a loaded PreTrainedModel"))
    tokenizer: Any = attrs.field(default=None, metadata=_help("Tokenizer ID or path; inferred from the model if not set"))
    processor: Any = attrs.field(default=None, metadata=_help("Processor ID or path (multimodal); inferred from the model if not set"))
    config_name: str | None = attrs.field(default=None, metadata=_help("Config name or path if different from the model"))
    precision: str = attrs.field(default="auto", validator=v.in_(PRECISIONS), metadata=_help("Dtype to load weights in: auto, float32, float16, bfloat16"))
    trust_remote_code_model: bool = attrs.field(default=False, metadata=_help("Allow custom model code from the repository"))
    save_compressed: bool = attrs.field(default=True, metadata=_help("Save weights in compressed format (False: dense fake-quantized weights)"))
    model_revision: str = attrs.field(default="main", metadata=_help("Model version: branch, tag or commit"))
    tie_word_embeddings: bool = attrs.field(default=False, metadata=_help("Keep tied input and output embeddings tied when the recipe leaves lm_head unquantized (False: always untie)"))
    allow_unquantized_fused_weights: bool = attrs.field(default=False, metadata=_help("Proceed when fused 3-D weights (MoE experts) that no installed patch linearizes would stay unquantized"))

    @model.validator
    def _check_model(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("model is required: a Hugging Face model ID, a local path, or a PreTrainedModel.")


@attrs.define(kw_only=True)
class RecipeArguments:
    recipe: Any = attrs.field(default=None, metadata=_help("Recipe: YAML path or string, a modifier, or a list of modifiers"))
    recipe_args: list[str] | dict[str, Any] | None = attrs.field(default=None, metadata=_help("Recipe overrides as key=value"))
    stage: str | None = attrs.field(default=None, metadata=_help("Run only this recipe stage"))
    allow_unmatched_targets: bool = attrs.field(default=False, metadata=_help("Run a quantizing modifier whose targets select no module of the model (it then quantizes nothing) instead of refusing"))

    @recipe_args.validator
    def _check_recipe_args(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is None or isinstance(value, dict):
            return
        items = [value] if isinstance(value, str) else value
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"recipe_args entries must look like key=value, got {item!r}.")


@attrs.define(kw_only=True)
class DatasetArguments:
    dataset: Any = attrs.field(default=None, metadata=_help("Registered dataset name, a datasets.Dataset/DatasetDict, or a torch DataLoader"))
    dataset_config_name: str | None = attrs.field(default=None, metadata=_help("Dataset configuration name"))
    dataset_path: str | None = attrs.field(default=None, metadata=_help("Local JSON, JSONL or CSV file (or folder) to calibrate on"))
    splits: str | None = attrs.field(default=None, metadata=_help("Dataset split to calibrate on (default: calibration/train)"))
    num_calibration_samples: int = attrs.field(default=512, validator=_positive, metadata=_help("Number of calibration samples"))
    max_seq_length: int = attrs.field(default=384, validator=_positive, metadata=_help("Tokens per sample after truncation"))
    batch_size: int = attrs.field(default=1, validator=_positive, metadata=_help("Calibration batch size"))
    data_collator: str | Callable[..., Any] = attrs.field(default="truncation", validator=_collator, metadata=_help("'truncation' (cut a batch to its shortest sample), 'padding', or a callable"))
    shuffle_calibration_samples: bool = attrs.field(default=True, metadata=_help("Shuffle before selecting samples (seeded)"))
    seed: int = attrs.field(default=42, metadata=_help("Seed for shuffling calibration samples"))
    text_column: str = attrs.field(default="text", metadata=_help("Dataset column holding the text"))
    concatenate_data: bool = attrs.field(default=False, metadata=_help("Concatenate samples to fill max_seq_length"))
    streaming: bool = attrs.field(default=False, metadata=_help("Stream the dataset instead of downloading it whole"))
    preprocessing_num_workers: int | None = attrs.field(default=None, validator=_positive, metadata=_help("Workers for dataset preprocessing"))
    dataloader_num_workers: int = attrs.field(default=0, metadata=_help("Workers for the calibration DataLoader"))
    pad_to_max_length: bool = attrs.field(default=True, metadata=_help("Pad every sample to max_seq_length"))
    moe_calibrate_all_experts: bool = attrs.field(default=True, metadata=_help("Route all tokens through all MoE experts during calibration"))
    preprocessing_func: Callable[..., Any] | None = attrs.field(default=None, validator=v.optional(v.is_callable()), metadata=_help("Function applied to every dataset row (datasets.map) before tokenization"))
    remove_columns: list[str] | None = attrs.field(default=None, converter=_str_list, metadata=_help("Dataset columns to drop after preprocessing"))
    overwrite_cache: bool = attrs.field(default=False, metadata=_help("Accepted for llm-compressor scripts; llmc keeps no dataset cache of its own"))
    min_tokens_per_module: float | None = attrs.field(default=None, metadata=_help("Warn when a module receives less than this fraction of tokens"))
    use_loss_mask: bool = attrs.field(default=False, metadata=_help("Only tokens whose 'loss_mask' (a tokenized dataset's column) is 1 count in AWQ's statistics and loss"))


@attrs.define(kw_only=True)
class PipelineArguments:
    pipeline: str | None = attrs.field(default="independent", metadata=_help("Calibration pipeline: independent, basic, sequential, datafree"))
    sequential_targets: list[str] | None = attrs.field(default=None, converter=_str_list, metadata=_help("Module classes or names calibrated one at a time by the sequential pipeline"))
    sequential_offload_device: str = attrs.field(default="cpu", metadata=_help("Where cached activations live between sequential layers"))
    quantization_aware_calibration: bool = attrs.field(default=True, metadata=_help("Feed quantized layer outputs to the next layer in the sequential pipeline"))
    propagate_error: bool | None = attrs.field(default=None, metadata=_help("llm-compressor's name for quantization_aware_calibration; overrides it when given"))
    tracing_ignore: list[str] | None = attrs.field(default=None, converter=_str_list, metadata=_help("Accepted for llm-compressor scripts; llmc's sequential pipeline traces nothing"))
    sequential_targets_per_subgraph: int = attrs.field(default=1, validator=_positive, metadata=_help("Accepted for llm-compressor scripts; llmc calibrates one target at a time"))
    sequential_prefetch: bool = attrs.field(default=False, metadata=_help("Prefetch the next batch in a background thread"))
    device: str | None = attrs.field(default=None, metadata=_help("Execution device (default: cuda if available, else cpu)"))

    def __attrs_post_init__(self) -> None:
        if self.propagate_error is not None:
            self.quantization_aware_calibration = self.propagate_error


@attrs.define(kw_only=True)
class OutputArguments:
    output_dir: str | None = attrs.field(default=None, metadata=_help("Directory to save the compressed model; nothing is saved if unset"))
    log_dir: str | None = attrs.field(default=None, metadata=_help("Directory for timestamped log files"))
    overwrite_output_dir: bool = attrs.field(default=False, metadata=_help("Replace a non-empty output_dir"))
    saver: str = attrs.field(default="compressed-tensors", metadata=_help("Registered saver that writes the checkpoint"))
    quantization_format: str | None = attrs.field(default=None, metadata=_help("compressed-tensors format for every quantized module (default: inferred per scheme)"))
    clear_sparse_session: bool = attrs.field(default=False, metadata=_help("Accepted for llm-compressor scripts; llmc keeps no session between calls"))
    resume: bool = attrs.field(default=True, metadata=_help("Keep the sequential pipeline's progress beside output_dir, so that the same command after a crash continues from the last saved layer"))
    resume_interval: float = attrs.field(default=60.0, validator=v.ge(0), metadata=_help("Seconds between saves of that progress (never more than a tenth of the run's time); 0: after every layer"))


GROUPS: tuple[type, ...] = (
    ModelArguments,
    RecipeArguments,
    DatasetArguments,
    PipelineArguments,
    OutputArguments,
)


@attrs.frozen
class OneshotArguments:
    model: ModelArguments
    recipe: RecipeArguments
    dataset: DatasetArguments
    pipeline: PipelineArguments
    output: OutputArguments


def all_field_names() -> list[str]:
    return [f.name for group in GROUPS for f in attrs.fields(group)]


def parse_oneshot_args(**kwargs: Any) -> OneshotArguments:
    """Split flat keyword arguments into validated groups."""
    valid = all_field_names()
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"oneshot() got an unknown argument {key!r}.{hint}")
    built = []
    for group in GROUPS:
        names = {f.name for f in attrs.fields(group)}
        built.append(group(**{k: val for k, val in kwargs.items() if k in names}))
    return OneshotArguments(*built)
