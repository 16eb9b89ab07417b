"""Hook specifications: every way a plugin extends llmc.

Two kinds of hook live here.

*Registration hooks* are called once, when the plugin manager builds its
registry (see :mod:`llmc.plugins`). Each receives a ``register`` callable; the
plugin calls it once per thing it provides. The registry remembers which plugin
registered what, so ``llmc plugins`` can show it and a name clash is an error.

*Lifecycle hooks* are called by a pipeline on every modifier that is
active in the running stage (modifiers are registered with the plugin manager
for the duration of their stage) and on any installed plugin that implements
them (progress reporters, loggers). Modifiers are called in recipe order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from llmc.lifecycle import State
    from llmc.mappings import Mapping
    from llmc.modifiers.base import Modifier
    from llmc.patches import ModelPatch
    from llmc.quantization.observers import Observer

PROJECT = "llmc"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration -----------------------------------------------------------


@hookspec
def llmc_register_modifiers(register: Callable[[type[Modifier]], None]) -> None:
    """Register modifier classes.

    Called once when the registry is built. Call ``register(cls)`` for each
    :class:`llmc.modifiers.Modifier` subclass the plugin provides; it becomes
    usable by its class name in recipes and as ``from llmc.modifiers import Name``.
    """


@hookspec
def llmc_register_pipelines(register: Callable[..., None]) -> None:
    """Register calibration pipelines.

    Called once when the registry is built. Call ``register(name, run,
    requires_data=True)``: ``run(state, modifiers)`` drives the lifecycle hooks for
    those modifiers over ``state.model`` and ``state.dataloader`` (see
    :mod:`llmc.pipelines`); ``requires_data=False`` for one that runs no forward pass.
    ``name`` is what ``pipeline=`` and ``Modifier.pipeline()`` take.
    """


@hookspec
def llmc_register_savers(register: Callable[[str, Callable[..., None]], None]) -> None:
    """Register checkpoint savers.

    Called once when the registry is built. Call ``register(name, save)`` where
    ``save(model, output_dir, *, processor, recipe_yaml, save_compressed)``
    writes a complete checkpoint into ``output_dir`` (an empty, temporary
    directory that the caller moves into place when ``save`` returns).
    """


@hookspec
def llmc_register_datasets(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register named calibration datasets.

    Called once when the registry is built. Call ``register(name, load)`` where
    ``load(dataset_args, split)`` returns a ``datasets.Dataset`` whose rows hold a
    ``text`` column (or ``messages``/``input_ids``), ready to tokenize.
    """


@hookspec
def llmc_register_model_patches(register: Callable[[ModelPatch], None]) -> None:
    """Register model patches and calibration contexts.

    Called once when the registry is built. Call ``register(patch)`` with a
    :class:`llmc.patches.ModelPatch`. Oneshot applies every patch whose
    ``matches(model)`` is true after loading the model (model-specific fixes),
    and enters each matching patch's ``calibration_context(model, dataset_args)``
    around calibration (e.g. routing every token through every MoE expert).
    """


@hookspec
def llmc_register_converters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register checkpoint converters for ``model_free_ptq(converter=...)``.

    Called once when the registry is built. Call ``register(name, factory)`` where
    ``factory(**kwargs)`` returns a compressed-tensors ``Converter``: an object
    whose ``process(tensors)`` turns one shard's tensors from another format
    into compressed-tensors (or dense) tensors, with ``validate``,
    ``get_dependencies`` and ``update_config`` as compressed-tensors defines them.
    """


@hookspec
def llmc_register_mappings(register: Callable[[str, str, Sequence[Mapping]], None]) -> None:
    """Register one algorithm's default smooth/balance mappings for an architecture.

    Called once when the registry is built. Call ``register(algorithm, architecture,
    mappings)``: ``algorithm`` is the name the modifier resolves its defaults under
    (``"smoothquant"``, ``"awq"``, or a third party's own), ``architecture`` a
    transformers class name (``"LlamaForCausalLM"``), ``mappings`` a list of
    :class:`llmc.api.Mapping`. A recipe without ``mappings`` uses them; an algorithm
    package registers its own for the dense models, a model plugin for its family.
    """


@hookspec
def llmc_register_observers(register: Callable[[str, type[Observer]], None]) -> None:
    """Register observers: how a weight's or an activation's range is estimated.

    Called once when the registry is built. Call ``register(name, cls)`` with a
    subclass of :class:`llmc.quantization.observers.Observer`; a quantization
    argument's ``observer: name`` (or a modifier's ``weight_observer`` /
    ``input_observer`` / ``output_observer``) selects it. ``cls(args)`` is built
    once per observed value and fed flattened observations.
    """


# --- modifier lifecycle -----------------------------------------------------


@hookspec
def llmc_initialize(state: State) -> None:
    """Called once per stage, before its pipeline runs.

    Modifiers attach to the model here: apply quantization schemes, resolve
    mappings, validate targets. No calibration data has been seen yet.

    :param state: the model, pipeline arguments, device and data of the stage.
    """


@hookspec
def llmc_calibration_start(state: State) -> None:
    """Called when the pipeline is about to run the first calibration forward pass.

    Modifiers register their forward hooks (observers, Hessian accumulators)
    and compute anything that needs only the weights. A hook that collects data
    must skip passes with ``state.observing`` false: the sequential pipeline runs
    each layer a second time only to propagate its outputs
    (:meth:`llmc.api.Modifier.observe` does this, and removes its hooks itself).

    :param state: as for :func:`llmc_initialize`.
    """


@hookspec
def llmc_batch_end(state: State, batch_index: int) -> None:
    """Called after each calibration batch has passed through the model
    (or, in the sequential pipeline, through the current layer).

    :param state: as for :func:`llmc_initialize`; ``state.loss_mask`` holds the
        batch's loss mask with ``use_loss_mask``.
    :param batch_index: the batch's position in the calibration data (it restarts
        at 0 for every layer of the sequential pipeline).
    """


@hookspec
def llmc_sequential_layer_end(state: State, layer_name: str, layer: torch.nn.Module) -> None:
    """Called when every calibration batch has passed through one sequential
    target (a decoder layer by default). Modifiers compress that layer now, so
    its outputs can be recomputed with the compressed weights for the next one.
    Change only ``layer``'s tensors here: the next target's weights are already
    staged for the device (a replaced tensor is staged again, an in-place edit
    of another layer would be lost).

    :param state: as for :func:`llmc_initialize`.
    :param layer_name: the target's module name (``model.layers.3``).
    :param layer: the target itself, its weights on the execution device.
    """


@hookspec
def llmc_calibration_end(state: State) -> None:
    """Called after the last calibration forward pass. Modifiers that did not
    compress layer by layer do their remaining work here and remove hooks."""


@hookspec
def llmc_finalize(state: State) -> None:
    """Called once per stage after its pipeline finished. Modifiers freeze
    quantization parameters and leave the model ready to save."""
