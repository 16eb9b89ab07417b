"""oneshot's arguments, in llm-compressor's names, defaults and groups.

Each group is an attrs class validated on construction; :func:`parse_oneshot_args`
splits a flat keyword set into the groups and names any unknown keyword along
with the closest valid one. The CLI builds its options from the same fields.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import attrs
from attrs import validators as v

PRECISIONS = ("auto", "float32", "float16", "bfloat16", "float", "half", "bf16", "fp16", "fp32")


def _help(text: str, cli: str | None = None) -> dict[str, str]:
    """A field's help; ``cli``, where the shell can pass less than Python (no objects)."""
    return {"help": text, "cli_help": cli or text}


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
    model: Any = attrs.field(metadata=_help("Hugging Face model ID, local path, or a loaded PreTrainedModel", "Hugging Face model ID or local path"))
    tokenizer: Any = attrs.field(default=None, metadata=_help("Tokenizer ID or path, or a loaded tokenizer; inferred from the model if not set", "Tokenizer ID or path; inferred from the model if not set"))
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
    recipe: Any = attrs.field(default=None, metadata=_help("Recipe: YAML path or string, a modifier, or a list of modifiers", "Recipe: a YAML file (or a YAML string)"))
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
    dataset: Any = attrs.field(default=None, metadata=_help("Registered dataset name, a datasets.Dataset/DatasetDict, or a torch DataLoader", "Registered dataset name (see `llmc plugins`; llmc-docs is the offline corpus)"))
    dataset_config_name: str | None = attrs.field(default=None, metadata=_help("Dataset configuration name"))
    dataset_path: str | None = attrs.field(default=None, metadata=_help("Local JSON, JSONL or CSV file (or folder) to calibrate on"))
    splits: str | None = attrs.field(default=None, metadata=_help("Dataset split to calibrate on (default: calibration/train)"))
    num_calibration_samples: int = attrs.field(default=512, validator=_positive, metadata=_help("Number of calibration samples"))
    max_seq_length: int = attrs.field(default=384, validator=_positive, metadata=_help("Tokens per sample after truncation"))
    batch_size: int = attrs.field(default=1, validator=_positive, metadata=_help("Calibration batch size"))
    data_collator: str | Callable[..., Any] = attrs.field(default="truncation", validator=_collator, metadata=_help("'truncation' (cut a batch to its shortest sample), 'padding', or a callable", "'truncation' (cut a batch to its shortest sample) or 'padding'"))
    shuffle_calibration_samples: bool = attrs.field(default=True, metadata=_help("Shuffle before selecting samples (seeded)"))
    seed: int = attrs.field(default=42, metadata=_help("Seed for shuffling calibration samples"))
    text_column: str = attrs.field(default="text", metadata=_help("Dataset column holding the text"))
    concatenate_data: bool = attrs.field(default=False, metadata=_help("Concatenate samples to fill max_seq_length"))
    streaming: bool = attrs.field(default=False, metadata=_help("Stream the dataset instead of downloading it whole"))
    preprocessing_num_workers: int | None = attrs.field(default=None, validator=_positive, metadata=_help("Workers for dataset preprocessing"))
    dataloader_num_workers: int = attrs.field(default=0, metadata=_help("Workers for the calibration DataLoader"))
    pad_to_max_length: bool = attrs.field(default=True, metadata=_help("Pad every sample to max_seq_length"))
    moe_calibrate_all_experts: bool = attrs.field(default=True, metadata=_help("Route all tokens through all MoE experts during calibration"))
    preprocessing_func: Callable[..., Any] | None = attrs.field(default=None, validator=v.optional(v.is_callable()), metadata=_help("Function applied to every dataset row (datasets.map) before tokenization", "Python API only: a function applied to every dataset row before tokenization"))
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


def _field(name: str) -> attrs.Attribute:
    return next(f for group in GROUPS for f in attrs.fields(group) if f.name == name)


def parse_oneshot_args(**kwargs: Any) -> OneshotArguments:
    """Split flat keyword arguments into validated groups."""
    valid = all_field_names()
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"oneshot() got an unknown argument {key!r}.{hint}")
    missing = [p.name for p in oneshot_parameters() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        described = "; ".join(f"{name} ({_field(name).metadata['help']})" for name in missing)
        raise TypeError(f"oneshot() is missing the required argument {described}.")
    built = []
    for group in GROUPS:
        names = {f.name for f in attrs.fields(group)}
        built.append(group(**{k: val for k, val in kwargs.items() if k in names}))
    return OneshotArguments(*built)


# --- oneshot's signature, for help(), IDEs and type checkers ---------------------------------

ONESHOT_SUMMARY = """Load a model, run a recipe of modifiers over calibration data, save the result.

llm-compressor 0.14's oneshot arguments, in its groups; every argument is keyword-only.
Returns the compressed model (also saved in compressed-tensors format when output_dir is set).
"""


def oneshot_parameters() -> list[inspect.Parameter]:
    """oneshot's keyword-only parameters, from the argument classes."""
    params = []
    for group in GROUPS:
        for f in attrs.fields(group):
            default = f.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = None
            default = inspect.Parameter.empty if default is attrs.NOTHING else default
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    return params


def oneshot_doc() -> str:
    lines = [ONESHOT_SUMMARY]
    for group in GROUPS:
        lines.append(f"{group.__name__}:")
        lines += [f"    {f.name}: {f.metadata.get('help', '')}" for f in attrs.fields(group)]
    return "\n".join(lines) + "\n"


def stub() -> str:
    """``llmc/__init__.pyi``: the public facade with oneshot's real keyword signature, written
    from the argument classes (``python -m llmc.args > packages/core/src/llmc/__init__.pyi``)."""
    from llmc.model_free import model_free_ptq, reindex_fused_weights

    def arguments(params: list[inspect.Parameter], keyword_only: bool = False) -> str:
        out = ["*"] if keyword_only else []
        for p in params:
            text = f"{p.name}: {p.annotation}" if p.annotation is not inspect.Parameter.empty else p.name
            if p.default is not inspect.Parameter.empty:
                text += f" = {p.default!r}"
            out.append(text)
        return "".join(f"\n    {a}," for a in out) + "\n"

    def facade(fn: Any) -> str:
        sig = inspect.signature(fn)
        first = (fn.__doc__ or "").strip().splitlines()[0]
        return f'def {fn.__name__}({arguments(list(sig.parameters.values()))}) -> Summary:\n    """{first}"""\n'

    doc = oneshot_doc().replace('"""', "'''")
    return (
        "# Written by `python -m llmc.args` from llmc/args.py; tests/test_cli.py checks it is current.\n"
        "import os\nfrom collections.abc import Callable, Iterable\nfrom typing import Any\n\n"
        "import torch\nfrom compressed_tensors.quantization import QuantizationScheme\n\n"
        "from llmc.model_free import Summary\n\n"
        "__version__: str\n__all__: list[str]\n\n\n"
        f"def oneshot({arguments(oneshot_parameters(), keyword_only=True)}) -> Any:\n    \"\"\"{doc}\"\"\"\n\n\n"
        f"{facade(model_free_ptq)}\n\n{facade(reindex_fused_weights)}"
    )


if __name__ == "__main__":
    print(stub(), end="")
