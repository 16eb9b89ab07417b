"""The modifier base class: recipe arguments plus lifecycle hook implementations."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from llmc.hookspecs import PROJECT, hookimpl
from llmc.observing import input_only

if TYPE_CHECKING:
    import torch

    from llmc.lifecycle import State


@attrs.define(kw_only=True)
class Modifier:
    """One compression algorithm, configured by recipe arguments.

    Subclasses are attrs classes whose init fields are the recipe arguments, and
    override the ``on_*`` methods they need. The ``llmc_*`` methods are the
    pluggy hook implementations that a session calls while the modifier's stage
    runs; they only forward to ``on_*``.
    """

    # Fields llm-compressor's Modifier carries and writes into the recipe.yaml it saves: its
    # training schedule (start/end/update, in epochs), a recipe's ordering (index, group), and
    # whether a modifier needs data. oneshot has no epochs, and llmc reads the order from the
    # recipe and the need for data from the pipeline: accepted so those recipes run unchanged,
    # and without effect.
    index: int | None = None
    group: str | None = None
    start: float | None = None
    end: float | None = None
    update: float | None = None
    requires_calibration_data: bool | None = None

    # Whether this modifier reduces what it accumulates over the ranks of a distributed run
    # (llmc.distributed): oneshot refuses, under torchrun, a calibrating modifier that does
    # not, as it would compress from each rank's share of the data alone.
    data_parallel: ClassVar[bool] = False

    # forward hooks of :meth:`observe`, removed when calibration ends
    _observations: list[Any] = attrs.field(factory=list, init=False, repr=False, eq=False)

    def pipeline(self) -> str:
        """Name of the calibration pipeline this modifier needs under ``independent``: by
        default ``datafree``, which core ships (initialize and finalize, no forward pass).
        A modifier that calibrates on data returns ``basic`` (the whole model per batch) or
        ``sequential`` (layer by layer), both from ``llmc-pipelines``."""
        return "datafree"

    def observe(
        self,
        state: State,
        module: torch.nn.Module,
        fn: Callable[..., None],
        output: bool = False,
        call: bool = False,
    ) -> None:
        """Call ``fn(x)`` with ``module``'s input (its first positional argument; its output
        with ``output=True``; ``fn(args, kwargs)``, the whole call, with ``call=True``) on
        every calibration forward pass, not on the passes a pipeline runs only to propagate
        a layer's outputs (``state.observing`` false). The hook is removed when calibration
        ends, so a modifier keeps no hook handles of its own."""

        @input_only
        def on_input(module: torch.nn.Module, args: tuple) -> None:
            if state.observing:
                fn(args[0])

        @input_only
        def on_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if state.observing:
                fn(args, kwargs)

        def on_output(module: torch.nn.Module, args: tuple, out: Any) -> None:
            if state.observing:
                fn(out[0] if isinstance(out, (tuple, list)) else out)

        if call:
            handle = module.register_forward_pre_hook(on_call, with_kwargs=True)
        elif output:
            handle = module.register_forward_hook(on_output)
        else:
            handle = module.register_forward_pre_hook(on_input)
        self._observations.append(handle)

    # --- override these -----------------------------------------------------
    def on_initialize(self, state: State) -> None: ...

    def on_calibration_start(self, state: State) -> None: ...

    def on_batch_end(self, state: State, batch_index: int) -> None: ...

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None: ...

    def on_calibration_end(self, state: State) -> None: ...

    def on_finalize(self, state: State) -> None: ...

    # --- resuming a crashed run (optional) ------------------------------------
    def sequential_layer_state(self, state: State, layer_name: str) -> dict[str, torch.Tensor]:
        """What this modifier keeps of a finished sequential target beyond the target's own
        parameters and buffers (which the pipeline saves): e.g. observed activation ranges
        it still reads at calibration end. Handed back to :meth:`on_sequential_layer_restored`."""
        return {}

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        """Called, instead of calibrating the target and :meth:`on_sequential_layer_end`, for a
        target a resumed run restored (its tensors are loaded already). Do the bookkeeping
        ``on_sequential_layer_end`` would have done (mark its modules done, drop their
        accumulators), nothing more. A modifier that does not override this is not
        resumable: a pipeline running it starts over and keeps no progress."""
        raise NotImplementedError

    def resumable(self) -> bool:
        return type(self).on_sequential_layer_restored is not Modifier.on_sequential_layer_restored

    def handles(self, hook_name: str) -> bool:
        """Whether this modifier acts on hook ``hook_name``: whether its class overrides it, or
        the ``on_*`` method it forwards to.

        Only these hooks are registered for its stage, so a pipeline can skip an event
        nobody handles: a per-batch hook call costs the thread that launches the kernels
        about as much as launching one.
        """
        if hook_name == f"{PROJECT}_calibration_end":
            return True  # removes what observe() hooked, whether or not the class overrides it
        forwarded = "on_" + hook_name.removeprefix(f"{PROJECT}_")
        cls = type(self)
        return any(getattr(cls, n, None) is not getattr(Modifier, n, None) for n in (hook_name, forwarded))

    # --- hook implementations ----------------------------------------------
    @hookimpl
    def llmc_initialize(self, state: State) -> None:
        self.on_initialize(state)

    @hookimpl
    def llmc_calibration_start(self, state: State) -> None:
        self.on_calibration_start(state)

    @hookimpl
    def llmc_batch_end(self, state: State, batch_index: int) -> None:
        self.on_batch_end(state, batch_index)

    @hookimpl
    def llmc_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        self.on_sequential_layer_end(state, layer_name, layer)

    @hookimpl
    def llmc_calibration_end(self, state: State) -> None:
        self.on_calibration_end(state)
        for handle in self._observations:
            handle.remove()
        self._observations.clear()

    @hookimpl
    def llmc_finalize(self, state: State) -> None:
        self.on_finalize(state)

    # --- recipes -------------------------------------------------------------
    @classmethod
    def from_recipe_args(cls, args: dict[str, Any]) -> Modifier:
        """Build from a recipe's argument mapping, naming any unknown argument."""
        valid = [f.name for f in attrs.fields(cls) if f.init]
        for key in args:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"{cls.__name__} has no argument {key!r}.{hint} Valid arguments: "
                    f"{', '.join(valid)}."
                )
        fields = attrs.fields_dict(cls)
        for key, value in args.items():
            # a field with a converter takes what its converter takes (targets: a name or a list)
            expected = None if fields[key].converter is not None else _simple_types(str(fields[key].type))
            if expected is not None and not any(_fits(value, t) for t in expected):
                raise TypeError(
                    f"{cls.__name__} argument {key!r} must be {' or '.join(expected)}, got {value!r} "
                    f"({type(value).__name__})."
                )
        return cls(**args)

    @classmethod
    def describe_arguments(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) of every recipe argument, for ``llmc plugins --modifier``."""
        out = []
        for f in attrs.fields(cls):
            if f.init:
                default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[arg-type]
                out.append((f.name, str(f.type), default, f.metadata.get("help", "")))
        return out

    def recipe_args(self) -> dict[str, Any]:
        """The arguments that differ from their defaults, as plain YAML-able data."""
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):
            if not field.init:
                continue
            value = getattr(self, field.name)
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            if value != default:
                out[field.name] = to_plain(value)
        return out


_SIMPLE = {"int", "float", "bool", "str", "None", "list", "dict"}


def _simple_types(annotation: str) -> list[str] | None:
    """The plain types a field's annotation allows (``int | None`` -> int, None), or None when
    it names anything else (then the modifier's own validators judge)."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    return kinds if all(kind in _SIMPLE for kind in kinds) else None


def _fits(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list":
        return isinstance(value, (list, tuple))
    return isinstance(value, {"str": str, "dict": dict}[kind])


def to_plain(value: Any) -> Any:
    """Convert recipe values (tuples, pydantic models, attrs classes such as a mapping, enums)
    to YAML-safe data."""
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "model_dump"):
        return to_plain(value.model_dump(mode="json", exclude_none=True))
    if attrs.has(type(value)):
        return to_plain({k: v for k, v in attrs.asdict(value, recurse=False).items() if v is not None})
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
