"""The ``llmc`` command line: plugins, oneshot, demo.

oneshot's options are generated from the argument classes in :mod:`llmc.args`,
so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import attrs

from llmc import __version__
from llmc.args import GROUPS

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE | _FALSE:
        return low in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_field(parser: argparse.ArgumentParser, field: attrs.Attribute) -> None:
    kind = str(field.type)
    help_text = field.metadata.get("help", "")
    default = field.default if not isinstance(field.default, attrs.Factory) else None  # type: ignore[arg-type]
    if default is not attrs.NOTHING and default is not None:
        help_text += f" (default: {default})"
    options: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
    if kind.startswith("bool"):
        options.update(type=_bool, nargs="?", const=True, metavar="BOOL")
    elif kind.startswith("int"):
        options.update(type=int)
    elif kind.startswith("float"):
        options.update(type=float)
    elif kind.startswith("list"):
        options.update(nargs="+")
    if field.name == "recipe_args":
        options.update(nargs="+", metavar="KEY=VALUE")
    flags = [f"--{field.name}"]
    if "_" in field.name:
        flags.append(f"--{field.name.replace('_', '-')}")
    parser.add_argument(*flags, dest=field.name, **options)


def _oneshot_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for group in GROUPS:
        section = parser.add_argument_group(group.__name__)
        for field in attrs.fields(group):
            _add_field(section, field)  # type: ignore[arg-type]
    return parser


def _cmd_oneshot(ns: argparse.Namespace) -> int:
    from llmc import oneshot

    kwargs = {k: v for k, v in vars(ns).items() if k not in ("command", "func", "debug")}
    oneshot(**kwargs)
    return 0


def _cmd_plugins(ns: argparse.Namespace) -> int:
    from llmc.plugins import get_plugin_manager, get_registry

    pm = get_plugin_manager()
    registry = get_registry()
    dists = {id(p): (d.project_name, d.version) for p, d in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        dist, version = dists.get(id(plugin), ("-", "-"))
        provided = [e for e in registry.entries if e.plugin == name]
        what = "; ".join(
            f"{kind.replace('_', ' ')}{'es' if kind.endswith('h') else 's'}: "
            f"{', '.join(e.name for e in provided if e.kind == kind)}"
            for kind in dict.fromkeys(e.kind for e in provided)
        )
        rows.append((name, dist, version, what or "(lifecycle hooks only)"))
    header = ("plugin", "distribution", "version", "registers")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from llmc import logs
    from llmc.demo import run_demo

    logs.configure()
    result = run_demo(workdir=ns.workdir, scheme=ns.scheme)
    print(result.table())
    return 0


def _cmd_model_free_ptq(ns: argparse.Namespace) -> int:
    from llmc import logs
    from llmc.model_free import model_free_ptq

    logs.configure()
    summary = model_free_ptq(
        ns.model_stub,
        ns.save_directory,
        scheme=ns.scheme,
        ignore=ns.ignore,
        max_workers=ns.max_workers,
        device=ns.device,
        converter=ns.converter,
    )
    print(summary)
    return 0


def _cmd_reindex(ns: argparse.Namespace) -> int:
    from llmc import logs
    from llmc.model_free import reindex_fused_weights

    logs.configure()
    print(reindex_fused_weights(ns.model_stub, ns.save_directory, num_workers=ns.num_workers))
    return 0


def _model_free_parsers(commands: Any) -> None:
    mf = commands.add_parser(
        "model-free-ptq",
        help="Quantize safetensors shards with a data-free scheme, without building the model.",
        description="Data-free quantization straight on safetensors shards (llm-compressor's model_free_ptq).",
    )
    mf.add_argument("model_stub", help="Folder of *.safetensors shards (or a hub ID in the local cache)")
    mf.add_argument("save_directory", help="Where to write the compressed checkpoint")
    mf.add_argument("--scheme", required=True, help="Preset name, e.g. FP8_BLOCK, NVFP4A16, W4A16")
    mf.add_argument(
        "--ignore", action="append", default=[], metavar="NAME",
        help="Module name or 're:' regex to leave unquantized (repeatable)",
    )
    mf.add_argument("--max-workers", "--max_workers", type=int, default=1, help="Shards processed at once")
    mf.add_argument("--device", default=None, help="Execution device (default: cuda if available)")
    mf.add_argument("--converter", default=None, help="Registered converter name (see `llmc plugins`)")
    mf.set_defaults(func=_cmd_model_free_ptq)

    rx = commands.add_parser(
        "reindex-fused-weights",
        help="Rewrite a checkpoint so q/k/v and gate/up weights share a shard.",
    )
    rx.add_argument("model_stub")
    rx.add_argument("save_directory")
    rx.add_argument("--num-workers", "--num_workers", type=int, default=5)
    rx.set_defaults(func=_cmd_reindex)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmc",
        description="Compress Hugging Face LLMs into compressed-tensors checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"llmc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also LLMC_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    oneshot = commands.add_parser(
        "oneshot",
        help="Quantize a model with a recipe and calibration data, and save it.",
        description="Quantize a model with a recipe and calibration data (llm-compressor's arguments).",
    )
    _oneshot_parser(oneshot).set_defaults(func=_cmd_oneshot)

    plugins = commands.add_parser("plugins", help="List discovered plugins and what each registers.")
    plugins.set_defaults(func=_cmd_plugins)

    demo = commands.add_parser(
        "demo",
        help="Build a small model, compress it with the strongest installed algorithm, compare.",
    )
    demo.add_argument("--scheme", default="W4A16", help="Scheme to compress with (default: W4A16)")
    demo.add_argument("--workdir", default=None, help="Keep the checkpoints here (default: a temp dir)")
    demo.set_defaults(func=_cmd_demo)
    _model_free_parsers(commands)
    return parser


USER_ERRORS = (ValueError, TypeError, LookupError, FileExistsError, FileNotFoundError, OSError)


def _debugging(ns: argparse.Namespace) -> bool:
    return bool(getattr(ns, "debug", False) or os.environ.get("LLMC_DEBUG"))


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except USER_ERRORS as exc:
        if _debugging(ns):
            raise
        print(f"llmc {ns.command}: error: {exc}", file=sys.stderr)
        return 2


def oneshot_main(argv: Sequence[str] | None = None) -> int:
    """The ``oneshot`` console script, compatible with llm-compressor's."""
    parser = _oneshot_parser(argparse.ArgumentParser(prog="oneshot", description="llmc oneshot"))
    parser.set_defaults(func=_cmd_oneshot, command="oneshot")
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except USER_ERRORS as exc:
        if _debugging(ns):
            raise
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 2
