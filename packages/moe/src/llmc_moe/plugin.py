"""Entry-point plugin: the MoE model patch, the MoE families' default mappings, and the
lifecycle events that release the stacked expert weights kept during a layer's passes."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_model_patches(register):
    from llmc_moe.patch import MoEPatch

    register(MoEPatch())


@hookimpl
def llmc_register_mappings(register):
    from llmc_moe.mappings import builtin_moe_mappings

    for architecture, (smoothquant, awq) in builtin_moe_mappings().items():
        register("smoothquant", architecture, smoothquant)
        register("awq", architecture, awq)


def _clear_stacks(model) -> None:
    from llmc_moe.linearize import linear_experts

    for _, module in linear_experts(model):
        module.clear_stacks()


@hookimpl
def llmc_sequential_layer_end(state, layer_name, layer):
    """Stacked expert weights kept for a layer's pass are stale once its modifiers edit it, and
    its layer is done: at most one layer's copy stays on the device."""
    _clear_stacks(state.model)


@hookimpl
def llmc_calibration_end(state):
    _clear_stacks(state.model)


@hookimpl
def llmc_finalize(state):
    """Say, before the checkpoint is written, what will not reload it."""
    from llmc_moe.reloading import warn_unreloadable

    warn_unreloadable(state.model)
