"""Core's built-ins, registered through the ``llmc`` entry point like any plugin."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_modifiers(register):
    from llmc.modifiers.quantization import QuantizationModifier

    register(QuantizationModifier)


@hookimpl
def llmc_register_pipelines(register):
    from llmc.pipelines.datafree import run_datafree
    from llmc.pipelines.independent import run_independent

    register("datafree", run_datafree, requires_data=False)
    register("independent", run_independent)


@hookimpl
def llmc_register_savers(register):
    from llmc.saving import save_compressed_tensors

    register("compressed-tensors", save_compressed_tensors)


@hookimpl
def llmc_register_datasets(register):
    from llmc.data import corpus, hub

    register(corpus.NAME, corpus.load)
    register(corpus.LARGE_NAME, corpus.load_large)
    for name, dataset in hub.BUILTINS.items():
        register(name, dataset)


@hookimpl
def llmc_register_converters(register):
    from compressed_tensors.entrypoints.convert import converters

    register("modelopt-nvfp4", converters.ModelOptNvfp4Converter)
    register("fp8-block-dequantizer", converters.FP8BlockDequantizer)
    register("autoawq", converters.AutoAWQConverter)


@hookimpl
def llmc_register_observers(register):
    from llmc.quantization.observers import BUILTIN_OBSERVERS

    for name, observer in BUILTIN_OBSERVERS.items():
        register(name, observer)
