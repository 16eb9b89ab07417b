"""The ``llmc`` command line: plugins, oneshot, demo.

oneshot's options are generated from the argument classes in :mod:`llmc.args`,
so the CLI and the Python API cannot drift apart. transformers' ``HfArgumentParser``
(llm-compressor's choice) would need dataclasses, and gives neither the closest
option to a mistyped one nor errors in the shell's words, which this parser adds:
errors raised for the Python API are rewritten (``dataset=`` becomes ``--dataset``),
and a command prints one line and exits 2 for a bad input, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import attrs

from llmc import __version__
from llmc.args import GROUPS, all_field_names

_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def _bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE | _FALSE:
        return low in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_field(parser: argparse.ArgumentParser, field: attrs.Attribute) -> None:
    kind = str(field.type)
    # what the shell can pass (no loaded model, Dataset or DataLoader objects)
    help_text = field.metadata.get("cli_help") or field.metadata.get("help", "")
    default = field.default if not isinstance(field.default, attrs.Factory) else None  # type: ignore[arg-type]
    if default is not attrs.NOTHING and default is not None:
        help_text += f" (default: {default})"
    options: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
    if default is attrs.NOTHING:
        options["required"] = True
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


_GLOBAL_OPTIONS = ("command", "func", "debug", "log_level")


def _cmd_oneshot(ns: argparse.Namespace) -> int:
    import logging

    from llmc import oneshot

    kwargs = {k: v for k, v in vars(ns).items() if k not in _GLOBAL_OPTIONS}
    if kwargs.get("output_dir") is None:
        logging.getLogger("llmc").warning(
            "No --output_dir: the compressed model will not be saved anywhere (the Python API returns it)."
        )
    oneshot(**kwargs)
    return 0


def _cmd_modifier_arguments(name: str) -> int:
    from llmc.plugins import get_registry

    cls = get_registry().get("modifier", name)
    rows = [(n, t, repr(d), h) for n, t, d, h in cls.describe_arguments()]
    header = ("argument", "type", "default", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _cmd_plugins(ns: argparse.Namespace) -> int:
    from llmc.plugins import get_plugin_manager, get_registry

    if ns.modifier:
        return _cmd_modifier_arguments(ns.modifier)

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
    from llmc.demo import run_demo

    result = run_demo(workdir=ns.workdir, scheme=ns.scheme)
    print(result.table())
    return 0


def _cmd_model_free_ptq(ns: argparse.Namespace) -> int:
    from llmc.model_free import model_free_ptq

    model_free_ptq(
        ns.model_stub,
        ns.save_directory,
        scheme=ns.scheme,
        ignore=ns.ignore,
        max_workers=ns.max_workers,
        device=ns.device,
        converter=ns.converter,
    )  # its summary is logged
    return 0


def _cmd_reindex(ns: argparse.Namespace) -> int:
    from llmc.model_free import reindex_fused_weights

    reindex_fused_weights(ns.model_stub, ns.save_directory, num_workers=ns.num_workers)  # its summary is logged
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
        description="Rewrite a safetensors checkpoint so that weights quantized with one shared scale "
        "(q/k/v, gate/up: NVFP4's global scale) sit in one shard, for model_free_ptq to process "
        "them together (llm-compressor's reindex_fused_weights). Tensors are copied, not changed.",
    )
    rx.add_argument("model_stub", help="Folder of *.safetensors shards (or a hub ID in the local cache)")
    rx.add_argument("save_directory", help="Where to write the reindexed checkpoint")
    rx.add_argument("--num-workers", "--num_workers", type=int, default=5, help="Shards written at once (default: 5)")
    rx.set_defaults(func=_cmd_reindex)


class _Parser(argparse.ArgumentParser):
    """argparse, naming the closest option to a mistyped one (as the Python API names the
    closest argument)."""

    _arguments: Sequence[str] = ()

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        self._arguments = list(sys.argv[1:] if args is None else args)  # for error() to check
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        known = {o for action in self._actions for o in action.option_strings}
        for subparsers in (a for a in self._actions if isinstance(a, argparse._SubParsersAction)):
            known |= {o for p in subparsers.choices.values() for a in p._actions for o in a.option_strings}
        hints = []
        for flag in dict.fromkeys(a.split("=")[0] for a in self._arguments if a.startswith("--")):
            if flag not in known:
                close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
                hints.append(f"unknown option {flag}" + (f": did you mean {close[0]}?" if close else ""))
        super().error(message + "".join(f"\n  {hint}" for hint in hints))


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also LLMC_DEBUG=1)")
    parser.add_argument(
        "--log-level", "--log_level", dest="log_level", default=None, metavar="LEVEL",
        help="llmc's log level: DEBUG, INFO, WARNING, ERROR (default: $LLMC_LOG_LEVEL, else INFO)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llmc",
        description="Compress Hugging Face LLMs into compressed-tensors checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"llmc {__version__}")
    _global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    oneshot = commands.add_parser(
        "oneshot",
        help="Quantize a model with a recipe and calibration data, and save it.",
        description="Quantize a model with a recipe and calibration data (llm-compressor's arguments).",
    )
    _oneshot_parser(oneshot).set_defaults(func=_cmd_oneshot)

    plugins = commands.add_parser(
        "plugins", help="List discovered plugins and what each registers.",
        description="List every installed plugin, its distribution and version, and what it registers; "
        "with --modifier, one modifier's recipe arguments.",
    )
    plugins.add_argument("--modifier", metavar="NAME", help="List this modifier's recipe arguments: type, default, help")
    plugins.set_defaults(func=_cmd_plugins)

    demo = commands.add_parser(
        "demo",
        help="Build a small model, compress it with the strongest installed algorithm, compare.",
        description="Build and briefly train a small Llama on the offline corpus (no download), compress "
        "it with the strongest installed algorithm (GPTQ with llmc-gptq, else round-to-nearest), reload "
        "the result with transformers and print size, perplexity and agreement before and after. "
        "Checkpoints go to a temporary directory that is removed at the end, unless --workdir keeps them.",
    )
    demo.add_argument("--scheme", default="W4A16", help="Scheme to compress with (default: W4A16)")
    demo.add_argument("--workdir", default=None, help="Keep the checkpoints in this directory (default: a temporary one, removed)")
    demo.set_defaults(func=_cmd_demo)
    _model_free_parsers(commands)
    return parser


USER_ERRORS = (ValueError, TypeError, LookupError, FileExistsError, FileNotFoundError, OSError)


def _debugging(ns: argparse.Namespace) -> bool:
    return bool(getattr(ns, "debug", False) or os.environ.get("LLMC_DEBUG"))


def shell_message(message: str, flags: set[str]) -> str:
    """An error written for the Python API, in the shell's words: ``name=True`` is ``--name``,
    ``name=`` is ``--name`` for every option name of the command."""
    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if name not in flags:
            return match.group(0)
        return f"--{name}" + ("" if value == "True" else f" {value}" if value else "")

    return re.sub(r"\b([a-z][a-z0-9_]*)=(True\b|'[^']*'|[\w./-]*\w)?", flag, message)


def _interrupted(ns: argparse.Namespace, prog: str) -> int:
    """Ctrl-C: one line saying what is on disk, exit status 130."""
    from llmc.resume import resume_path

    out = getattr(ns, "output_dir", None) or getattr(ns, "save_directory", None)
    if out is None:
        said = "nothing was saved"
    elif getattr(ns, "command", None) in ("model-free-ptq", "reindex-fused-weights"):
        said = f"finished shards stay in {out}; the same command resumes"
    elif resume_path(out).exists():
        said = f"{out} was not written; the progress in {resume_path(out)} lets the same command continue"
    else:
        said = f"{out} was not written"
    print(f"{prog}: interrupted; {said}.", file=sys.stderr)
    return 130


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str) -> int:
    from llmc import logs

    ns = parser.parse_args(argv)
    name = f"{prog} {ns.command}" if prog == "llmc" else prog
    try:
        logs.configure_cli(ns.log_level)
        return ns.func(ns)
    except KeyboardInterrupt:
        if _debugging(ns):
            raise
        return _interrupted(ns, name)
    except USER_ERRORS as exc:
        if _debugging(ns):
            raise
        flags = {a.dest for a in parser._actions} | set(all_field_names())
        print(f"{name}: error: {shell_message(str(exc), flags)}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv, "llmc")


def oneshot_main(argv: Sequence[str] | None = None) -> int:
    """The ``oneshot`` console script, compatible with llm-compressor's."""
    parser = _oneshot_parser(_Parser(prog="oneshot", description="llmc oneshot"))
    _global_options(parser)
    parser.set_defaults(func=_cmd_oneshot, command="oneshot")
    return _run(parser, argv, "oneshot")
