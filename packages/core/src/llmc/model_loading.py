"""Preprocessing: load the model and its tokenizer or processor, untie embeddings, apply patches."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, PreTrainedModel

from llmc.args import ModelArguments
from llmc.patches import matching_patches

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def saved_class(config: Any) -> Any:
    """The transformers class a saved config names (``architectures``, e.g. a vision-language
    model's ``...ForConditionalGeneration``, which ``AutoModelForCausalLM`` may not know), else
    ``AutoModelForCausalLM``: to build the checkpoint's model as it was saved."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM


def build_saved(config: Any, **kwargs: Any) -> PreTrainedModel:
    """A model of :func:`saved_class` built from ``config`` (random weights, or none on the meta device)."""
    cls = saved_class(config)
    return cls.from_config(config, **kwargs) if cls is AutoModelForCausalLM else cls._from_config(config, **kwargs)


def check_model_source(model: Any) -> None:
    """Fail fast on a local path that cannot hold a model."""
    if isinstance(model, PreTrainedModel) or not isinstance(model, (str, os.PathLike)):
        return
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model={str(model)!r} is a file; pass the checkpoint's directory.")
        if not (path / "config.json").is_file():
            raise ValueError(f"model={str(model)!r} has no config.json; it is not a transformers checkpoint.")
        if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
            raise ValueError(
                f"model={str(model)!r} holds no weights (*.safetensors or *.bin); "
                "was the checkpoint saved completely?"
            )
    elif str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ValueError(f"model path {str(model)!r} does not exist.")
    else:  # a hub id: without the hub or a cached copy, say so now, not after minutes of retries
        from huggingface_hub import try_to_load_from_cache

        from llmc.data import hub_reachable

        try:
            cached = isinstance(try_to_load_from_cache(str(model), "config.json"), str)
        except ValueError:  # not a valid repository id either
            raise ValueError(f"model={str(model)!r} is neither a local directory nor a hub model id.") from None
        if not cached and not hub_reachable():
            raise ValueError(
                f"model={str(model)!r} is no local directory, and the Hugging Face hub, where it "
                "would be a model id, is out of reach with no cached copy. Check the path."
            )


def load_model(args: ModelArguments) -> PreTrainedModel:
    if isinstance(args.model, PreTrainedModel):
        return args.model
    check_model_source(args.model)
    dtype: Any = "auto" if args.precision == "auto" else _DTYPES[args.precision]
    kwargs: dict[str, Any] = dict(
        dtype=dtype, trust_remote_code=args.trust_remote_code_model, revision=args.model_revision
    )
    if args.config_name:
        from transformers import AutoConfig

        kwargs["config"] = AutoConfig.from_pretrained(
            args.config_name, trust_remote_code=args.trust_remote_code_model
        )
    try:
        return AutoModelForCausalLM.from_pretrained(str(args.model), **kwargs)
    except (SafetensorError, pickle.UnpicklingError) as exc:
        raise ValueError(
            f"Could not read the weights of {str(args.model)!r} ({type(exc).__name__}: {exc}). A "
            "*.safetensors file is truncated or corrupt, or a *.bin file holds pickled objects torch "
            "refuses to load; re-download or re-save the checkpoint as safetensors."
        ) from None
    except OSError as exc:
        raise OSError(
            f"Could not load model {str(args.model)!r}: {exc}\nPass a local checkpoint "
            "directory, or a Hugging Face model ID reachable from this machine."
        ) from exc


def load_processor(args: ModelArguments, model: PreTrainedModel) -> Any:
    """The tokenizer or processor to save beside the model and to tokenize calibration data."""
    given = args.processor if args.processor is not None else args.tokenizer
    if given is not None and not isinstance(given, (str, os.PathLike)):
        return given
    source = given or (args.model if isinstance(args.model, (str, os.PathLike)) else None)
    source = source or getattr(model.config, "_name_or_path", None)
    if not source:
        return None
    kwargs = dict(trust_remote_code=args.trust_remote_code_model, revision=args.model_revision)
    loaders = (AutoProcessor, AutoTokenizer) if args.processor is not None else (AutoTokenizer, AutoProcessor)
    for loader in loaders:
        try:
            return loader.from_pretrained(str(source), **kwargs)
        except Exception as exc:  # the next loader, or no processor at all
            logger.debug("%s could not load %s: %s", loader.__name__, source, exc)
    logger.warning("No tokenizer or processor found for %s; none will be saved.", source)
    return None


def untie_word_embeddings(model: PreTrainedModel) -> None:
    """Give lm_head its own weight so it can be quantized (or ignored) on its own."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return
    if outputs.weight is inputs.weight or outputs.weight.data_ptr() == inputs.weight.data_ptr():
        outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
        logger.info("Untied input and output embeddings.")
    for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def undispatch(model: PreTrainedModel) -> None:
    """Take a dispatch off a model loaded with ``device_map``, by accelerate or by
    compressed-tensors' offloading (``load_offloaded_model``, ``dispatch_model``): weights
    offloaded to CPU or disk come back into their modules on the CPU and the hooks go, so that
    llmc's pipelines move layers themselves, as llm-compressor 0.14 re-dispatches such models."""
    counts = [c for c in (_remove_accelerate(model), _remove_offload_caches(model)) if c is not None]
    if not counts:
        return
    restored = sum(counts)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(
            f"The model was dispatched with weights llmc cannot find ({left[0]} is on the meta device): "
            "load it without device_map, or pass the model's path."
        )
    model.to("cpu")
    logger.info("Took the device_map dispatch off the model (%d offloaded tensors back on the CPU).", restored)


def _remove_accelerate(model: PreTrainedModel) -> int | None:
    """accelerate's hooks off ``model``: how many offloaded tensors came back, None if unhooked."""
    hooked = [m for m in model.modules() if hasattr(m, "_hf_hook")]
    if not hooked:
        return None
    from accelerate.hooks import remove_hook_from_module

    restored = 0
    for module in hooked:
        weights = getattr(module._hf_hook, "weights_map", None)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.device.type == "meta" and weights is not None and name in weights:
                value = weights[name].to("cpu")
                if isinstance(tensor, torch.nn.Parameter):
                    module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[name] = value
                restored += 1
    remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    return restored


def _remove_offload_caches(model: PreTrainedModel) -> int | None:
    """compressed-tensors' offloading off ``model``: every module's offloaded tensors staged in
    CPU memory (read back from disk, or copied from a device) and its plain parameters and
    forward restored; how many tensors were offloaded, None if nothing was."""
    from compressed_tensors.offload import OffloadCache
    from compressed_tensors.offload.module import remove_module_offload

    offloaded = [m for m in model.modules() if isinstance(m._parameters, OffloadCache)]
    if not offloaded:
        return None
    restored = 0
    shared: dict[int, tuple[Any, Any]] = {}  # a tensor offloaded once (tied) is staged once
    for module in offloaded:
        staged = {
            kind: {name: _staged(cache, value, shared) for name, value in cache.offloaded_values.items()}
            for kind, cache in (("_parameters", module._parameters), ("_buffers", module._buffers))
        }
        remove_module_offload(module, onload_tensors=False)
        for kind, values in staged.items():
            getattr(module, kind).update(values)
            restored += len(values)
    return restored


def _staged(cache: Any, value: torch.Tensor | None, shared: dict[int, tuple[Any, Any]]) -> torch.Tensor | None:
    """One offloaded tensor in CPU memory, a Parameter if it was one. ``shared`` maps the
    offloaded tensors staged so far (kept alive there, so that no id is reused) to their copy."""
    if id(value) not in shared:
        staged = cache.stage(value)
        if isinstance(value, torch.nn.Parameter) and not isinstance(staged, torch.nn.Parameter):
            staged = torch.nn.Parameter(staged, requires_grad=False)
        shared[id(value)] = (value, staged)
    return shared[id(value)][1]


def preprocess(
    args: ModelArguments, quantizes_output_embeddings: Callable[[PreTrainedModel], bool] = lambda model: True
) -> tuple[PreTrainedModel, Any]:
    """Load the model and its processor, untie its embeddings (unless ``tie_word_embeddings``
    and the recipe leaves the output embeddings unquantized: then a tie stays), apply patches."""
    model = load_model(args)
    processor = load_processor(args, model)
    model.eval()
    undispatch(model)
    if not args.tie_word_embeddings:
        untie_word_embeddings(model)
    elif quantizes_output_embeddings(model):
        logger.info("tie_word_embeddings: the recipe quantizes the output embeddings, so they are untied.")
        untie_word_embeddings(model)
    apply_patches(model)
    return model, processor


def apply_patches(model: PreTrainedModel) -> None:
    """Apply every installed model patch that matches ``model`` (e.g. llmc-moe's linearized experts)."""
    for patch in matching_patches(model):
        logger.info("Applying model patch %s", patch.name)
        patch.apply(model)
