"""oneshot: preprocess, calibrate, postprocess.

Every check that can fail on the user's input (arguments, recipe, plugins,
output directory, model path) runs before the model is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import attrs
import torch
from transformers import PreTrainedModel

from llmc import distributed, logs
from llmc.args import OneshotArguments, parse_oneshot_args
from llmc.data import build_calibration_dataloader, load_calibration_rows
from llmc.fused_weights import check_fused_weights
from llmc.lifecycle import State
from llmc.locking import output_lock
from llmc.model_loading import check_model_source, preprocess
from llmc.patches import matching_patches
from llmc.pipelines import resolve_pipelines, run_pipeline
from llmc.plugins import PluginNotFoundError, Registry, get_registry
from llmc.quantization.targets import quantizes_output_embeddings
from llmc.recipe import Recipe
from llmc.resume import ResumeStore, fingerprint
from llmc.saving import (
    atomic_directory,
    check_output_apart_from_model,
    check_output_dir,
    patch_save_pretrained,
)

logger = logging.getLogger(__name__)


def _concrete_pipelines(recipe: Recipe, pipeline: str) -> list[str]:
    """The pipelines that will run forward passes (``independent`` only dispatches)."""
    names = [p for stage in recipe.stages for p in resolve_pipelines(pipeline, stage.modifiers)]
    return list(dict.fromkeys(names))


def _check_plugins(registry: Registry, pipelines: list[str], saver: str) -> None:
    for name in pipelines:
        if not registry.has("pipeline", name):
            raise PluginNotFoundError(registry.missing_message("pipeline", name))
    if not registry.has("saver", saver):
        raise PluginNotFoundError(registry.missing_message("saver", saver))


def _execution_device(name: str | None) -> torch.device:
    local = distributed.local_device()  # a distributed run: this rank's GPU
    if local is not None and name in (None, "cuda"):
        return local
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device={name!r} is not a device torch knows ({exc}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ValueError(f"device={name!r}, but this machine has no {device.type.upper()} device torch can use; "
                         "leave device unset (the accelerator if there is one, else the CPU) or pass device='cpu'.")
    if device.type != "cpu" and device.index is not None and device.index >= backend.device_count():
        raise ValueError(f"device={name!r}, but this machine has {backend.device_count()} {device.type} device(s).")
    return device


def _open_progress(args: OneshotArguments, recipe: Recipe, device: torch.device) -> ResumeStore | None:
    """Where a crashed run's layers are kept for the same command to resume (beside output_dir)."""
    if args.output.output_dir is None:
        return None
    if distributed.is_distributed():
        logger.info("A distributed run keeps no resumable progress (each rank holds a share of the data).")
        return None
    identity = None
    if args.output.resume:
        arguments = {
            **attrs.asdict(args.model, recurse=False),
            **attrs.asdict(args.dataset, recurse=False),
            **attrs.asdict(args.pipeline, recurse=False),
            "recipe_args": args.recipe.recipe_args,
            "stage": args.recipe.stage,
        }
        identity = fingerprint(arguments, recipe.to_yaml(), device)
    return ResumeStore.open(args.output.output_dir, identity, args.output.resume_interval, enabled=args.output.resume)


def oneshot(**kwargs: Any) -> PreTrainedModel:
    args = parse_oneshot_args(**kwargs)
    handler = logs.configure(args.output.log_dir)
    try:
        distributed.initialize()  # torchrun's process group, if launched by it
        # only the rank that saves holds the output's lock
        lock = output_lock(args.output.output_dir) if distributed.is_main() else contextlib.nullcontext()
        with lock:
            return _run(args)
    except BaseException as exc:
        distributed.report_failure(exc)  # the other ranks stop at their next collective
        raise
    finally:
        logs.release(handler)


def _check_data_parallel(modifiers: list[Any], pipelines: list[str]) -> None:
    if not distributed.is_distributed() or pipelines == ["datafree"]:
        return
    for modifier in modifiers:
        if modifier.pipeline() != "datafree" and not getattr(modifier, "data_parallel", False):
            raise ValueError(
                f"{type(modifier).__name__} does not calibrate data-parallel: under torchrun each of the "
                f"{distributed.world_size()} ranks would compress from its own share of the data. Run this "
                "recipe in one process (without torchrun)."
            )


def _run(args: OneshotArguments) -> PreTrainedModel:
    started = time.perf_counter()
    recipe = Recipe.load(args.recipe.recipe, args.recipe.recipe_args, args.recipe.stage)
    registry = get_registry()
    pipeline = args.pipeline.pipeline or "independent"
    pipelines = _concrete_pipelines(recipe, pipeline)
    _check_plugins(registry, [pipeline, *pipelines], args.output.saver)
    needs_data = any(registry.get("pipeline", p).requires_data for p in pipelines)
    has_data = args.dataset.dataset is not None or args.dataset.dataset_path is not None
    if needs_data and not has_data:
        raise ValueError(
            f"The recipe runs the {', '.join(pipelines)} pipeline, which needs calibration "
            "data: pass dataset= (e.g. 'llmc-docs', the offline corpus) or dataset_path=."
        )
    if has_data and not needs_data:
        logger.info("No modifier of this recipe calibrates on data (%s): the dataset is not loaded.", ", ".join(pipelines))
        has_data = False
    check_output_dir(args.output.output_dir, args.output.overwrite_output_dir)
    check_output_apart_from_model(args.output.output_dir, args.model.model)
    check_model_source(args.model.model)

    modifiers = [m for stage in recipe.stages for m in stage.modifiers]
    _check_data_parallel(modifiers, pipelines)
    device = _execution_device(args.pipeline.device)
    rows = load_calibration_rows(args.dataset) if has_data else None  # before the model: fails fast

    progress = _open_progress(args, recipe, device)

    model, processor = preprocess(args.model, lambda model: quantizes_output_embeddings(model, modifiers))
    check_fused_weights(model, modifiers, args.model.allow_unquantized_fused_weights)
    dataloader = build_calibration_dataloader(args.dataset, processor, rows) if has_data else None
    if dataloader is not None:
        dataloader = distributed.shard_calibration_data(dataloader)  # this rank's share

    with contextlib.ExitStack() as stack:
        for patch in matching_patches(model):
            stack.enter_context(patch.calibration_context(model, args.dataset))
        for stage in recipe.stages:
            logger.info("Stage %s: %s", stage.name, ", ".join(type(m).__name__ for m in stage.modifiers))
            state = State(
                model=model,
                pipeline_args=args.pipeline,
                device=device,
                dataloader=dataloader,
                processor=processor,
                stage=stage.name,
                stage_modifiers=tuple(stage.modifiers),
                progress=progress,
                allow_unmatched_targets=args.recipe.allow_unmatched_targets,
            )
            run_pipeline(pipeline, state, stage.modifiers)
    logger.info("Calibration finished in %.1f s", time.perf_counter() - started)

    if args.output.output_dir is not None and distributed.is_main():
        save = registry.get("saver", args.output.saver)
        # a saver that predates quantization_format is called as before unless it is set
        extra = {} if args.output.quantization_format is None else {"quantization_format": args.output.quantization_format}
        with atomic_directory(args.output.output_dir, overwrite=args.output.overwrite_output_dir) as tmp:
            save(
                model,
                tmp,
                processor=processor,
                recipe_yaml=recipe.to_saved_yaml(),
                save_compressed=args.model.save_compressed,
                **extra,
            )
        logger.info("Saved to %s", args.output.output_dir)
        if progress is not None:
            progress.remove()
    distributed.barrier()  # the others learn of a failed save, and return after it
    patch_save_pretrained(model, recipe.to_saved_yaml())  # for users who save by hand afterwards
    return model
