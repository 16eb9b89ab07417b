"""Entry-point plugin: registers this package's pipelines."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_pipelines(register):
    from llmc_pipelines.basic import run_basic
    from llmc_pipelines.sequential import run_sequential

    register("basic", run_basic)
    register("sequential", run_sequential)
