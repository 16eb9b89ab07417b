"""The ``sequential`` pipeline: calibrate one decoder layer at a time.

No tracing. One cheap forward per batch, with every sequential target replaced
by a recorder, captures each target's real call arguments (attention masks,
position embeddings, per-layer-type masks); then each target in turn is moved to
the execution device, run on every cached batch while modifiers observe it,
compressed by them at the layer-end event, and run again (when
``quantization_aware_calibration``) to produce the next target's inputs. The first
target is observed on each batch right after that batch's capture, while its inputs
are still on the device. Cached
activations live on ``sequential_offload_device``, and their copies always
overlap compute (see :mod:`llmc_pipelines.transfers`); arguments every batch
shares (rotary tables, position ids, masks) are stored and loaded once. Only
the running target's weights are on the execution device; the next target's are
staged in pinned memory meanwhile (see :mod:`llmc_pipelines.onloading`).
``sequential_prefetch`` is accepted for compatibility: the next batches always
load ahead.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from compressed_tensors.utils import is_match
from tqdm.auto import tqdm

from llmc.lifecycle import State, lifecycle, pop_loss_mask
from llmc.modifiers.base import Modifier
from llmc.observing import is_input_only
from llmc.quantization.calibrate import quantization_disabled, weights_quantized_once
from llmc.resume import SequentialProgress
from llmc_pipelines.basic import to_device
from llmc_pipelines.carried import Carry, handed_back, received
from llmc_pipelines.onloading import Onloader, lazily_onloaded
from llmc_pipelines.transfers import Chunk, Transfers, batches, same_tree
from llmc_pipelines.warming import start_attention_warm_up

logger = logging.getLogger(__name__)


# batches the capture keeps referenced for the current stream before the host waits for it
_HANDED_IN_FLIGHT = 8


@functools.cache
def _capture_stream(index: int) -> torch.cuda.Stream:
    """The capture's stream on CUDA device ``index``, one per process and device: cuBLAS keeps
    a workspace for every stream that ran a matrix product (the model's rotary tables do), so a
    new stream for each run would add one to the device's reserved memory every time."""
    return torch.cuda.Stream(index, priority=-1)


class _Captured(Exception):
    """Stops the capture forward once every target's call is known."""


class _NotAStack(ValueError):
    """The model does something between targets that layer-by-layer calibration would skip."""


def _mixed_layer_types(model: torch.nn.Module) -> bool:
    """Whether the model's config gives its layers more than one kind (``layer_types``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None else None
    kinds = getattr(text, "layer_types", None)
    return isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1


def sequential_targets(
    model: torch.nn.Module, targets: Sequence[str] | None
) -> list[tuple[str, torch.nn.Module]]:
    """The modules calibrated one at a time, outermost matches only, in execution order."""
    targets = list(targets or getattr(model, "_no_split_modules", None) or [])
    if not targets:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules: pass sequential_targets= "
            "(the decoder layer class name, e.g. ['LlamaDecoderLayer'])."
        )
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if is_match(name, module, targets):
            found.append((name, module))
    if not found:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"No module of {type(model).__name__} matches sequential_targets {targets}. "
            f"Module classes in this model: {', '.join(classes)}."
        )
    found = _whole_blocks(model, found, targets)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    for name, module in found:
        if len(names[id(module)]) > 1:
            raise ValueError(
                f"Sequential target {name} is shared (also reached as "
                f"{', '.join(names[id(module)][1:])}); layer-by-layer calibration needs each target "
                "to run once per forward. Use pipeline='basic', or sequential_targets= naming a "
                "module that is not shared."
            )
    _check_one_stack(model, found)
    return found


def reached_targets(
    model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]], loader: Any, device: torch.device
) -> list[tuple[str, torch.nn.Module]]:
    """The targets ``model`` runs on the first batch, in the order it runs them, when they lie in
    more than one stack (a vision tower's blocks beside a language model's layers): a text
    batch runs the language layers only, and the tower's are left out of calibration, as
    they would be of a traced graph. One forward with every target passing its input
    through (and, where the model then fails, once more with every target also returning the
    other outputs its class declares, as GLM-5's layers do); a single stack is taken as it is,
    without that forward."""
    if len({name.rpartition(".")[0] for name, _ in layers}) < 2:
        return layers
    order: list[int] = []

    def passing(index: int, declared: bool) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            order.append(index)
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            return handed_back(index, layers[index][1], hidden) if declared else hidden

        return forward

    originals = [layer.__dict__.get("forward") for _, layer in layers]
    batch = to_device(pop_loss_mask(next(iter(loader)))[0], device)
    try:
        for declared in (False, True):
            order.clear()
            for index, (_, layer) in enumerate(layers):
                layer.forward = passing(index, declared)
            try:
                with torch.no_grad(), lazily_onloaded(_shell(model, layers), device):
                    model(**batch, use_cache=False)
                break
            except Exception:
                if declared:
                    raise
    finally:
        for (_, layer), original in zip(layers, originals, strict=True):
            if original is None:
                del layer.forward
            else:
                layer.forward = original
    reached = [layers[i] for i in dict.fromkeys(order)]
    if not reached:
        raise ValueError(
            f"The calibration batches run none of {type(model).__name__}'s sequential targets "
            f"({layers[0][0]}, ...); pass sequential_targets= naming the layers they run."
        )
    left = [name for name, _ in layers if all(name != n for n, _ in reached)]
    if left:
        stacks = sorted({name.rpartition(".")[0] for name in left})
        logger.info(
            "The calibration batches do not run %s (%d targets): they are left out of calibration; "
            "modifiers see no inputs of their modules.", ", ".join(stacks), len(left),
        )
    return reached


def _whole_blocks(
    model: torch.nn.Module, found: list[tuple[str, torch.nn.Module]], targets: Sequence[str]
) -> list[tuple[str, torch.nn.Module]]:
    """Targets inside the blocks of a layer stack (a ModuleList's elements), such as the
    attention and MLP that llm-compressor's DeepSeek and GLM recipes name, become those
    blocks: llmc traces no graph between modules inside a layer, so it calibrates whole
    layers, each module of a layer still seeing the layer's real inputs."""
    modules = dict(model.named_modules())
    lifted: list[tuple[str, torch.nn.Module]] = []
    for name, _ in found:
        block = name
        parts = name.split(".")
        for depth in range(len(parts) - 1, 0, -1):  # the outermost ModuleList element above it
            if isinstance(modules.get(".".join(parts[: depth - 1])), torch.nn.ModuleList) and parts[depth - 1].isdigit():
                block = ".".join(parts[:depth])
        if all(block != n for n, _ in lifted):
            lifted.append((block, modules[block]))
    if [n for n, _ in lifted] != [n for n, _ in found]:
        logger.info(
            "sequential_targets %s lie inside the %s blocks of %s: llmc calibrates one whole %s at a time.",
            list(targets), type(lifted[0][1]).__name__, lifted[0][0].rpartition(".")[0], type(lifted[0][1]).__name__,
        )
    return lifted


def _check_one_stack(model: torch.nn.Module, found: list[tuple[str, torch.nn.Module]]) -> None:
    """Refuse targets in both stacks of an encoder-decoder model.

    The decoder's cross-attention reads the encoder's final output, which layer-by-layer
    calibration produces only after every encoder layer ran: captured decoder inputs
    would be silently wrong.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        return
    inside = {id(m) for m in model.get_encoder().modules()}
    encoder = [name for name, module in found if id(module) in inside]
    decoder = [name for name, module in found if id(module) not in inside]
    if encoder and decoder:

        def stack(names: list[str]) -> str:
            return "'re:^" + names[0].rsplit(".", 1)[0].replace(".", "\\.") + "\\.\\d+$'"

        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model and the sequential targets "
            f"include layers of both its encoder ({encoder[0]}, ...) and its decoder "
            f"({decoder[0]}, ...): the decoder needs the encoder's final output, which "
            "layer-by-layer calibration computes only at the end. Calibrate one stack, e.g. "
            f"sequential_targets=[{stack(encoder)}] (or the decoder's, [{stack(decoder)}]), "
            "or use pipeline='basic'."
        )


class LayerCall(NamedTuple):
    """One target's call arguments for one batch, hidden states excluded.

    Targets called with the same arguments (in one batch, or in consecutive
    batches whose arguments are equal) share one LayerCall object.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _shell(
    model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]]
) -> list[torch.nn.Module]:
    """Modules outside every target: what runs around the layers (embeddings, rotary, norm)."""
    inside = {id(m) for _, layer in layers for m in layer.modules()}
    return [m for m in model.modules() if id(m) not in inside]


class Capture:
    """Records every target's call, batch after batch, with the targets replaced by recorders.

    The recorders are installed once for all batches (on entry) and removed on exit;
    :meth:`batch` runs the model on one batch, appends the first target's input to
    :attr:`hidden` (unless ``store`` is off) and every target's call to :attr:`calls`,
    and returns the first target's input and call as the model made it, on the execution
    device. Arguments equal to the previous batch's are stored once. When the first batch
    gave every target the very same arguments (no per-layer masks), later batches stop at
    the first target: which layer gets which argument is the model's structure, not the data's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: list[tuple[str, torch.nn.Module]],
        device: torch.device,
        transfers: Transfers,
        store: bool = True,
        observing: Callable[[bool], None] = lambda on: None,
    ) -> None:
        self.model, self.layers, self.device, self.transfers = model, layers, device, transfers
        self.store = store
        # the modules around the targets (embeddings, Gemma's per-layer projection) run in the
        # capture and are observed there; the targets' own hooks, which fire around a recorder,
        # are not: ``observing`` is switched off for them
        self._observing = observing
        self._recording = False
        self._target_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.hidden: list[Chunk] = []  # every batch's input to the first target
        self.calls: list[list[LayerCall]] = []  # per batch, each target's call
        self._latest: dict[tuple, Any] = {}  # the last batch's arguments, to store repeats once
        self._originals: list[Any] = []
        # per batch: the calls so far; tensors shared by several arguments (masks, rotary
        # tables), offloaded once; the last call's arguments as the model passed them; what
        # the last recorder handed back
        self._calls: list[LayerCall] = []
        self._memo: dict[int, torch.Tensor] = {}
        self._last_arguments: tuple[tuple, dict] | None = None
        self._handed_back: torch.Tensor | None = None
        self._first: tuple[torch.Tensor, LayerCall] | None = None  # this batch's first call, on the device
        self._shared = False  # every target of the first batch got the same arguments
        # On CUDA the capture runs on a stream of its own, ahead of the others: the waits in
        # its forward (the model's mask checks, comparing arguments with the last batch's)
        # are then for its own kernels, not for the first target's calibration queued on
        # the current stream, which goes on meanwhile
        # (transfers' device: "cuda" resolved to the index tensors report)
        self._stream = _capture_stream(transfers.device.index) if device.type == "cuda" else None
        self._handed: tuple[torch.Tensor, LayerCall] | None = None  # the last batch's first call
        self._pending: collections.deque[tuple[torch.cuda.Event, tuple]] = collections.deque()

    def __enter__(self) -> Capture:
        if self._stream is not None:  # after whatever the current stream has queued
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self._recorders = [self._recorder(layer is self.layers[-1][1]) for _, layer in self.layers]
        for (_, layer), recorder in zip(self.layers, self._recorders, strict=True):
            self._originals.append(layer.__dict__.get("forward"))
            layer.forward = recorder
            self._target_hooks.append(layer.register_forward_pre_hook(self._entering, prepend=True))
            self._target_hooks.append(layer.register_forward_hook(self._leaving))
        return self

    def _entering(self, module: torch.nn.Module, args: tuple) -> None:
        if self._recording:
            self._observing(False)

    def _leaving(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._recording:
            self._observing(True)

    def __exit__(self, *exc: object) -> None:
        for handle in self._target_hooks:
            handle.remove()
        self._target_hooks.clear()
        for index in range(len(self._originals)):
            self._restore_forward(index)
        self._originals.clear()
        if self._stream is not None:  # later work comes after everything the capture queued
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._release_handed(wait=True)

    def _restore_forward(self, index: int) -> None:
        layer, original = self.layers[index][1], self._originals[index]
        if original is None:
            del layer.forward
        else:
            layer.forward = original

    @contextlib.contextmanager
    def released(self, index: int) -> Iterator[None]:
        """Target ``index`` runs its own forward inside the block (its recorder is back after):
        to calibrate it on a batch as soon as its inputs are known."""
        self._restore_forward(index)
        try:
            yield
        finally:
            self.layers[index][1].forward = self._recorders[index]

    def _recorder(self, last: bool) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            calls = self._calls
            hidden = received(args[0] if args else kwargs.pop("hidden_states"), self._handed_back)
            if args:
                args = (hidden, *args[1:])
            previous = self.calls[-1] if self.calls else None
            if not calls:
                if self.store:
                    self.transfers.append(self.hidden, hidden)
            elif previous is None:
                _check_nothing_between(
                    self.model, self.layers, len(calls), self._handed_back, hidden
                )
            arguments = (args[1:], kwargs)
            last_arguments, self._last_arguments = self._last_arguments, arguments
            if last_arguments is not None and same_tree(arguments, last_arguments):
                call = calls[-1]  # every layer gets the same arguments
            else:
                call = LayerCall(
                    *self.transfers.offload_arguments(arguments, self._memo, self._latest)
                )
                before = previous[len(calls)] if previous is not None else None
                if before is not None and same_tree(call, before):
                    call = before
            if not calls:
                self._first = hidden, LayerCall(*arguments)
            calls.append(call)
            if last:
                raise _Captured
            if self._shared:
                calls.extend([call] * (len(self.layers) - 1))
                raise _Captured
            self._handed_back = hidden
            # the real outputs are computed layer by layer later; the others it declares are
            # placeholders that the model passes on to later targets' calls
            index = len(calls) - 1
            return handed_back(index, self.layers[index][1], hidden)

        return record

    def batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, LayerCall]:
        """Record every target's call for ``batch``; returns the first target's hidden states
        and call arguments on the execution device."""
        self._calls, self._memo = [], {}
        calls, model, layers = self._calls, self.model, self.layers
        if self._stream is not None:
            self._release_handed()
        self._recording = True
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                model(**to_device(batch, self.device), use_cache=False)
        except _Captured:
            pass
        except _NotAStack:
            raise
        except Exception as err:
            reached = f"after {layers[len(calls) - 1][0]}" if calls else "before the first target"
            raise RuntimeError(
                f"{type(model).__name__} failed while the sequential pipeline captured its "
                f"targets' inputs ({reached}): {type(err).__name__}: {err}. The pipeline runs each "
                f"target ({type(layers[0][1]).__name__}) on its own, so a target's inputs may "
                "depend only on the previous target's hidden states, not on its other outputs "
                "(e.g. T5's position bias). Pass sequential_targets= naming a module that "
                "contains the dependency, or use pipeline='basic'."
            ) from err
        finally:  # no device tensors kept past the batch
            self._last_arguments = self._handed_back = None
            self._recording = False
            self._observing(True)  # the last target's recorder ends the forward before its hooks
        if len(calls) != len(layers):
            raise RuntimeError(
                f"The model called {len(calls)} of its {len(layers)} sequential targets in one "
                "forward pass; the sequential pipeline needs each target called exactly once. "
                "Pass sequential_targets= naming the repeated block (e.g. the decoder layer class)."
            )
        if not self.calls:
            # a model whose layers are of several kinds (linear and full attention, sliding and
            # global windows) may hand them the same arguments on an unpadded batch and not on a
            # padded one: each batch's calls are recorded whole
            self._shared = all(call is calls[0] for call in calls) and not _mixed_layer_types(model)
        self.calls.append(calls)
        first, self._first = self._first, None
        assert first is not None
        if self._stream is not None:
            # the current stream computes on it after the capture's kernels, on the device
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            self._handed = first
        return first

    def _release_handed(self, wait: bool = False) -> None:
        """Drop the batches handed to the current stream once its work on them is done.

        Their memory belongs to the capture's stream, which would reuse it at once: they
        stay referenced until an event recorded on the current stream after their use has
        passed (no ``record_stream``, which makes every allocation query events, see
        :class:`~llmc_pipelines.transfers.Transfers`). A few batches are in flight at most;
        with ``wait`` (or too many) the host waits."""
        if self._handed is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._pending.append((done, self._handed))
            self._handed = None
        while self._pending and (wait or len(self._pending) > _HANDED_IN_FLIGHT or self._pending[0][0].query()):
            self._pending.popleft()[0].synchronize()


def _check_nothing_between(
    model: torch.nn.Module,
    layers: list[tuple[str, torch.nn.Module]],
    index: int,
    handed_back: torch.Tensor,
    received: torch.Tensor,
) -> None:
    """Refuse a model that changes the hidden states between two targets (checked on the
    first batch): layer-by-layer calibration feeds each target the previous one's output
    and would skip the operation. A different shape is not a change: a model that indexes
    a tuple output (``outputs[0]``) gets a slice of the tensor a recorder handed back."""
    if received.shape == handed_back.shape and not torch.equal(received, handed_back):
        raise _NotAStack(
            f"{type(model).__name__} changes the hidden states between {layers[index - 1][0]} "
            f"and {layers[index][0]} with an operation outside the sequential targets; "
            "calibrating layer by layer would skip it. Pass sequential_targets= naming modules "
            "that include it, or use pipeline='basic'."
        )


class _Observed(Exception):
    """Ends a calibration forward once the layer's last observed module has been observed."""


class EarlyExit:
    """Stops a layer's calibration forward after the last module anything observes.

    When the calibration pass's outputs are thrown away (the propagation pass recomputes them
    from the compressed layer), the work after the last hooked module is wasted: in a
    decoder layer whose Linear inputs are observed, the down projection's product and the
    residual add, a sixth of the forward. The first batch runs whole and records the order
    in which the layer's modules run; the later ones stop in a hook registered after the last
    hooked module's own: before its forward when its hooks are all pre-hooks marked
    :func:`llmc.observing.input_only` (the forward is then skipped too), else after it.
    Nothing stops when the layer itself is hooked or a hooked module did not run on the first
    batch (an MoE expert no token reached: its place in the order is unknown).
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self._order: list[torch.nn.Module] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> EarlyExit:
        if self.layer._forward_hooks:
            return self
        for module in self.layer.modules():
            if module is not self.layer:
                self._handles.append(module.register_forward_pre_hook(self._record))
        return self

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        self._order.append(module)

    def arm(self) -> None:
        """After the first batch: stop the next ones after the last hooked module."""
        self._remove()
        hooked = [m for m in self.layer.modules() if m is not self.layer and (m._forward_hooks or m._forward_pre_hooks)]
        if not hooked or any(m not in self._order for m in hooked):
            return
        last = next(m for m in reversed(self._order) if m in hooked)  # the last to run

        def stop(*_: Any) -> None:
            raise _Observed

        if all(is_input_only(h) for h in last._forward_pre_hooks.values()) and not last._forward_hooks:
            self._handles.append(last.register_forward_pre_hook(stop))  # its forward is skipped too
        else:
            self._handles.append(last.register_forward_hook(stop))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self._remove()


def run_layer(
    layer: torch.nn.Module, hidden: torch.Tensor, call: LayerCall, carry: Carry | None = None, index: int = 0, batch: int = 0
) -> torch.Tensor:
    """Target ``index`` on one batch; every argument is already on the execution device but
    the outputs of earlier targets ``carry`` holds, filled in here (and this one's kept)."""
    if carry:  # some later target reads an earlier one's outputs: fill them in
        call = carry.fill(call, batch, hidden.device)
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        if carry is not None:
            carry.keep(index, batch, out)
        return out[0]
    return out


class _PhaseClock:
    """Wall time of each phase of one layer, for the debug log.

    Only when that log is on: timing a phase synchronises the device at its end,
    which stalls the launch of the next phase's kernels.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = logger.isEnabledFor(logging.DEBUG)
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())


def declared_targets(modifiers: Sequence[Modifier]) -> list[str] | None:
    """The ``sequential_targets`` a modifier of the run declares (llm-compressor's GPTQ field),
    read when oneshot's own argument is unset."""
    for modifier in modifiers:
        targets = getattr(modifier, "sequential_targets", None)
        if targets:
            return list(targets)
    return None


def _progress(
    state: State, modifiers: Sequence[Modifier], layers: list[tuple[str, torch.nn.Module]]
) -> SequentialProgress | None:
    """This run's saved progress, if the command keeps any and every modifier can resume."""
    if state.progress is None:
        return None
    unable = [type(m).__name__ for m in modifiers if not m.resumable()]
    if unable:
        logger.info("%s cannot resume a crashed run: this pipeline keeps no progress.", ", ".join(unable))
        state.progress.skip_run()
        return None
    return state.progress.sequential_run([name for name, _ in layers])


def _restore(
    state: State,
    modifiers: Sequence[Modifier],
    layers: list[tuple[str, torch.nn.Module]],
    progress: SequentialProgress,
    transfers: Transfers,
) -> list[Chunk]:
    """Load the finished layers a crashed run saved, tell the modifiers, and return the saved
    inputs of the next layer (none when every layer is done)."""
    logger.info("Resuming: %d of %d layers were finished by an earlier run (%s).", progress.done, len(layers), progress.root)
    for index in range(progress.done):
        name, layer = layers[index]
        saved = progress.restore_layer(index, layer)
        for position, modifier in enumerate(modifiers):
            modifier.on_sequential_layer_restored(state, name, layer, saved.get(position, {}))
    chunks: list[Chunk] = []
    if progress.done < len(layers):
        for batch in progress.hidden():
            transfers.append(chunks, batch)
        transfers.synchronize()
    return chunks


def _kept(state: State, modifiers: Sequence[Modifier], layer_name: str) -> dict[int, dict[str, torch.Tensor]]:
    """What each modifier (by position) keeps of a finished layer."""
    return {i: m.sequential_layer_state(state, layer_name) for i, m in enumerate(modifiers)}


def _capture_bytes(model: torch.nn.Module, loader: Any) -> int:
    """What the capture stores of the first target's inputs, estimated as the calibration
    rows' tokens times the input embedding's width (oneshot's loaders, whose dataset is a
    list of token rows); 0 when either is unknown."""
    rows = getattr(loader, "dataset", None)
    if not isinstance(rows, list):
        return 0
    try:
        weight = model.get_input_embeddings().weight
        tokens = sum(len(row["input_ids"]) for row in rows)
    except (AttributeError, KeyError, TypeError, NotImplementedError):
        return 0
    return tokens * weight.shape[-1] * weight.element_size()


def run_sequential(state: State, modifiers: Sequence[Modifier]) -> None:
    loader = state.require_data("The sequential pipeline")
    args = state.pipeline_args
    model = state.model
    layers = sequential_targets(model, args.sequential_targets or declared_targets(modifiers))
    layers = reached_targets(model, layers, loader, state.device)
    device, offload = state.device, torch.device(args.sequential_offload_device)
    qac = args.quantization_aware_calibration
    logger.info(
        "Sequential pipeline: %d targets of %s on %s",
        len(layers),
        type(layers[0][1]).__name__,
        device,
    )

    transfers = Transfers(device, offload)
    carry = Carry(offload)  # outputs the targets hand each other beside the hidden states (GLM-5)
    warming = start_attention_warm_up(model, device)  # while the inputs are captured
    with (
        contextlib.ExitStack() as preparing,
        lifecycle(state, modifiers) as hook,
        torch.no_grad(),
        contextlib.ExitStack() as stack,
    ):
        # pinned memory for what the capture stores, prepared from now on (until it ends)
        slabs_ready = preparing.enter_context(
            transfers.capturing(_capture_bytes(model, loader) if len(layers) > 1 else 0)
        )
        hook.llmc_calibration_start(state=state)
        if not qac:  # every pass runs unquantized, the capture's too
            stack.enter_context(quantization_disabled(model))
        # skipped when nobody handles it: a call per batch and layer costs the launching thread
        batch_end_handled = bool(hook.llmc_batch_end.get_hookimpls())
        masks: list[torch.Tensor | None] = []

        def calibration_pass(index: int) -> tuple[Callable[..., torch.Tensor | None], Any, bool]:
            """Target ``index``'s calibration step on one batch (batch index, hidden states,
            call), the context its pass runs in, and whether its outputs are kept: only
            without quantization-aware calibration (the next target's inputs), and not
            after the last target. Otherwise the pass ends after the last observed module."""
            layer = layers[index][1]
            kept = not qac and index + 1 < len(layers)
            early = contextlib.nullcontext() if kept else EarlyExit(layer)

            def calibrate(b: int, h: torch.Tensor, call: LayerCall) -> torch.Tensor | None:
                state.loss_mask = masks[b]
                state.batch_index = b
                try:
                    out = run_layer(layer, h, call, carry, index, b)
                except _Observed:
                    out = None
                if b == 0 and isinstance(early, EarlyExit):
                    early.arm()
                if batch_end_handled:
                    hook.llmc_batch_end(state=state, batch_index=b)
                return out

            return calibrate, early, kept

        onloader = Onloader([layer for _, layer in layers], device)  # stages while capturing
        turn = contextlib.ExitStack()  # the running target's onloading
        try:
            progress = _progress(state, modifiers, layers)
            start = progress.done if progress is not None else 0
            # The first target is calibrated on each batch as soon as the capture has its
            # inputs: its kernels run while the capture's host-side work for the next batch
            # goes on, and its inputs are stored only where a later pass reads them. Not
            # when resuming: the next target's inputs come from the saved progress.
            fused = start == 0
            first_outputs: list[Chunk] | None = None
            first_pass: Any = contextlib.nullcontext()  # the first target's early exit, when fused
            if fused:
                turn.enter_context(onloader.onloaded(0))
                calibrate_first, first_pass, kept = calibration_pass(0)
                if kept:
                    first_outputs = []
            stored = not fused or (qac and len(layers) > 1)  # the propagation pass reads them
            waited = time.perf_counter()
            slabs_ready.wait()  # registering memory while the capture launches kernels stalls it
            logger.debug("Waited %.2f s for the capture's pinned memory", time.perf_counter() - waited)

            def observing(on: bool) -> None:
                state.observing = on

            with (
                first_pass,
                lazily_onloaded(_shell(model, layers), device),
                Capture(model, layers, device, transfers, store=stored, observing=observing) as capture,
            ):
                started = time.perf_counter()
                for b, batch in enumerate(tqdm(loader, desc="Capturing inputs", unit="batch")):
                    batch, mask = pop_loss_mask(batch)
                    masks.append(mask)
                    state.loss_mask, state.batch_index = mask, b  # for the modules around the targets
                    hidden_states, call = capture.batch(batch)
                    if fused:
                        with capture.released(0):
                            out = calibrate_first(b, hidden_states, call)
                        if first_outputs is not None:
                            transfers.append(first_outputs, out)
                    del hidden_states, call
                logger.info(
                    "Captured the inputs of %d batches%s in %.1f s",
                    len(masks),
                    f" and calibrated {layers[0][0]} on them" if fused else "",
                    time.perf_counter() - started,
                )
            preparing.close()  # the pinned slabs the capture did not take
            state.observing = True
            state.loss_mask = None
            hidden, calls = capture.hidden, capture.calls
            del capture
            carry.read_by(calls)
            if carry and progress is not None and not start:  # a resumed one fails where it fills them in
                logger.info("The sequential targets hand each other outputs: this run keeps no progress to resume.")
                progress = None
            if start:
                hidden = _restore(state, modifiers, layers, progress, transfers)
            for index, (name, layer) in enumerate(
                tqdm(layers[start:], desc="Calibrating layers", unit="layer", initial=start, total=len(layers)),
                start=start,
            ):
                layer_calls = [batch_calls[index] for batch_calls in calls]
                last = index + 1 == len(layers)  # nothing reads the last target's outputs
                clock = _PhaseClock(device)

                def propagate(b: int, h: torch.Tensor, call: LayerCall, layer=layer, index=index) -> torch.Tensor:
                    state.batch_index = b
                    return run_layer(layer, h, call, carry, index, b)

                calibrated = fused and index == 0  # during the capture, already onloaded
                if not calibrated:
                    turn.enter_context(onloader.onloaded(index))
                with turn:
                    state.observing = True
                    if calibrated:
                        outputs = first_outputs
                    else:
                        calibrate, early, kept = calibration_pass(index)
                        with early:
                            outputs = transfers.forward(hidden, layer_calls, calibrate, store=kept)
                    state.loss_mask = None
                    clock.mark("calibration")
                    onloader.settle()  # other layers' weights are home before modifiers look
                    hook.llmc_sequential_layer_end(state=state, layer_name=name, layer=layer)
                    clock.mark("compression")
                    if qac and not last:  # the next layer sees the outputs after compression
                        state.observing = False
                        with weights_quantized_once(layer):
                            outputs = transfers.forward(hidden, layer_calls, propagate, store=True)
                        state.observing = True
                    clock.mark("propagation")
                logger.debug("%s: %s", name, clock)
                carry.done(index)
                if outputs is not None:
                    hidden = outputs
                if progress is not None:
                    modules, inputs = [m for _, m in layers], None if last else batches(hidden)
                    if progress.due(index + 1, modules, inputs):
                        onloader.settle()  # the finished layers' tensors are home
                        transfers.synchronize()  # and the next layer's inputs stored
                        progress.save(index + 1, modules, lambda k: _kept(state, modifiers, layers[k][0]), inputs)
        finally:
            turn.close()
            onloader.close()
            transfers.close()
            if warming is not None:
                warming.join()
            if device.type == "cuda":
                # the caching allocator keeps blocks per stream: the copy streams' (a layer's
                # weights, chunks of activations) would stay reserved for streams no later
                # run uses, about 100 MB a run for a model of a few hundred million parameters
                torch.cuda.empty_cache()
        stack.close()  # quantization as it was before the modifiers finish
        hook.llmc_calibration_end(state=state)
