"""Entry-point plugin: registers this package's pipelines."""

from __future__ import annotations

from llmc.hookspecs import hookimpl


@hookimpl
def llmc_register_pipelines(register):
    from llmc_pipelines.basic import run_basic

    register("basic", run_basic)
