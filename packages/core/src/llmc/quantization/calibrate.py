"""Set quantization parameters on modules that compressed-tensors has initialized."""

from __future__ import annotations

import contextlib
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStatus,
    QuantizationStrategy,
)
from compressed_tensors.quantization.utils import calculate_qparams

from llmc import distributed
from llmc.observing import input_only
from llmc.quantization.attention import has_query_tap, register_query_hook
from llmc.quantization.kv_cache import kv_cache_tap
from llmc.quantization.observers import (
    Observer,
    check_observable,
    flatten_for_calibration,
    global_scale,
    make_observer,
    range_global_scale,
    weight_qparams,
)

logger = logging.getLogger(__name__)

# Layers that inference engines fuse into one matmul must share a global scale.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


def fused_group_key(module_name: str) -> tuple[str, tuple[str, ...]] | None:
    """(parent, group) for a module that shares a fused matmul with its siblings, else None."""
    parent, _, leaf = module_name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return parent, group
    return None


def check_finite(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN or infinite weights before quantizing them: one such value makes its group's
    scale non-finite and the model's outputs NaN (one host sync for all of them).

    A sum is finite when every term is: one reduction per weight, where an elementwise test
    and its boolean tensor took 5 s on an 8B model's CPU weights; only a weight whose sum is
    not finite (a non-finite value, or finite ones summing past the dtype's range) is tested
    element by element."""
    weights = [(name, w) for name, w in weights if w.device.type != "meta"]
    if not weights:
        return
    sums = torch.stack([w.sum().float().to("cpu", non_blocking=True) for _, w in weights])
    suspects = [(name, w) for (name, w), ok in zip(weights, torch.isfinite(sums).tolist(), strict=True) if not ok]
    bad = [name for name, w in suspects if not bool(torch.isfinite(w).all())]
    if bad:
        first = dict(weights)[bad[0]]
        count = int((~torch.isfinite(first)).sum())
        raise ValueError(
            f"{bad[0]} holds {count} NaN or infinite value(s)"
            + (f" (and {len(bad) - 1} more weights do: {', '.join(bad[1:4])}{'...' if len(bad) > 4 else ''})" if len(bad) > 1 else "")
            + "; quantized, they would make scales and outputs NaN. Repair the checkpoint, or add "
            "those modules to ignore."
        )


def quantized_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if getattr(m, "quantization_scheme", None) is not None
    ]


def initialized_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules given a scheme by the config just applied and not yet frozen."""
    return [
        (name, m)
        for name, m in quantized_modules(model)
        if getattr(m, "quantization_status", None) == QuantizationStatus.INITIALIZED
    ]


def copy_into(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """``value`` into ``module``'s parameter ``name`` (its shape and dtype), if it has one."""
    param = getattr(module, name, None)
    if param is not None:
        param.detach().copy_(value.reshape(param.shape).to(param.dtype))


def fused_global_scales(
    modules: Iterable[tuple[str, torch.nn.Module]], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Per-module weight global scales, the minimum over each fused group."""
    scales: dict[str, torch.Tensor] = {}
    for name, module in modules:
        args = module.quantization_scheme.weights
        if args is not None and args.strategy == QuantizationStrategy.TENSOR_GROUP:
            weight = module.weight if device is None else module.weight.to(device)
            scales[name] = global_scale(weight, args)
    by_group: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for name in scales:
        key = fused_group_key(name)
        if key is not None:
            by_group[key].append(name)
    for members in by_group.values():
        shared = torch.stack([scales[m] for m in members]).min(dim=0).values
        for m in members:
            scales[m] = shared
    return scales


# (weight, its quantization arguments, its global scale or None) -> (scale, zero point)
QParams = Callable[[torch.Tensor, QuantizationArgs, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def calibrate_weight(
    module: torch.nn.Module,
    gscale: torch.Tensor | None = None,
    device: torch.device | None = None,
    qparams: QParams = weight_qparams,
    importance: torch.Tensor | None = None,
) -> None:
    """The module's weight scale and zero point, written into its qparams: ``qparams``
    (round to nearest over the observer's range by default), given the input channels'
    ``importance`` where the observer weighs by it (then as a fourth argument)."""
    args = module.quantization_scheme.weights
    if args is None:
        return
    weight = module.weight if device is None else module.weight.to(device)
    if gscale is not None:
        copy_into(module, "weight_global_scale", gscale)
    if importance is None:
        scale, zero_point = qparams(weight, args, gscale)
    else:
        scale, zero_point = qparams(weight, args, gscale, importance)  # type: ignore[call-arg]
    copy_into(module, "weight_scale", scale)
    copy_into(module, "weight_zero_point", zero_point)


def calibrate_weights(
    modules: list[tuple[str, torch.nn.Module]],
    device: torch.device | None = None,
    qparams: QParams = weight_qparams,
    importance: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every module's weight qparams (:func:`calibrate_weight`), NVFP4's global scales shared
    by fused groups; ``importance`` by module name, where measured."""
    gscales = fused_global_scales(modules, device)
    for name, module in modules:
        calibrate_weight(module, gscales.get(name), device, qparams, (importance or {}).get(name))


@contextlib.contextmanager
def quantization_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run forward passes without fake quantization (calibration that is not quantization-aware)."""
    modules = [m for _, m in quantized_modules(model)]
    previous = [getattr(m, "quantization_enabled", True) for m in modules]
    for m in modules:
        m.quantization_enabled = False
    try:
        yield
    finally:
        for m, enabled in zip(modules, previous, strict=True):
            m.quantization_enabled = enabled


@contextlib.contextmanager
def weights_quantized_once(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, each quantized Linear under ``module`` runs on its weight
    fake-quantized once on entry instead of at every call; activations are still quantized
    at every call.

    Why: compressed-tensors' quantized forward fake-quantizes the weight on each call. A
    pass of many batches over weights whose qparams are set (the sequential pipeline's
    propagation) repeats identical work, on an 8B layer about as much as its GEMMs. Marked
    compressed for the block, compressed-tensors' forward skips the weight's fake
    quantization; the originals come back on exit. Costs one copy of the weights.
    """
    from compressed_tensors.quantization import forward_quantize

    swapped: list[tuple[torch.nn.Module, torch.Tensor, QuantizationStatus]] = []
    try:
        for m in module.modules():
            scheme, status = getattr(m, "quantization_scheme", None), getattr(m, "quantization_status", None)
            if (
                scheme is None
                or scheme.weights is None
                or status is None
                or status >= QuantizationStatus.COMPRESSED
                or not getattr(m, "quantization_enabled", True)
                or not isinstance(getattr(m, "weight", None), torch.Tensor)
            ):
                continue
            original = m.weight.data
            quantized = forward_quantize(m, original, "weight", scheme.weights)
            swapped.append((m, original, status))
            m.weight.data, m.quantization_status = quantized, QuantizationStatus.COMPRESSED
        yield
    finally:
        for m, original, status in swapped:
            m.weight.data, m.quantization_status = original, status


def _write_activation_qparams(
    module: torch.nn.Module, base: str, args: QuantizationArgs, lo: torch.Tensor, hi: torch.Tensor
) -> None:
    gscale = range_global_scale(lo, hi, args)
    if gscale is not None:
        copy_into(module, f"{base}_global_scale", gscale)
    else:
        scale, zp = calculate_qparams(lo, hi, args)
        copy_into(module, f"{base}_scale", scale)
        copy_into(module, f"{base}_zero_point", zp)


def sibling_key(name: str) -> str:
    """``model.layers.3.mlp.experts.17.up_proj`` -> ``model.layers.*.mlp.experts.*.up_proj``:
    the modules that play one role in a stack of layers or experts."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _role(entry: _Observed) -> tuple[str, str, int | None]:
    """The modules whose ranges stand in for each other's: one role in a stack of layers or
    experts, and inputs of one width (Gemma 4's full attention layers have wider heads than its
    sliding ones, and group-wise ranges of different widths do not combine)."""
    weight = getattr(entry.module, "weight", None)
    width = None if weight is None else weight.shape[0] if entry.base == "output" else weight.shape[-1]
    return sibling_key(entry.name), entry.base, width


@attrs.define
class _Observed:
    name: str
    module: torch.nn.Module
    base: str
    args: QuantizationArgs
    observer: Observer
    # under a distributed run: (batch index, min, max) of each observation, replayed in the
    # whole calibration set's order by ActivationObservers.synchronize; None once synchronized
    history: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None


class ActivationObservers:
    """Forward hooks that keep static activation scales current during calibration.

    Each static value (a Linear's input or output, an attention module's keys and
    values) gets the observer its arguments name (see
    :mod:`llmc.quantization.observers`). Its range is written into the module's
    qparams after every batch so that quantization-aware forward passes use the
    estimate so far. A module that saw no data at all (an MoE expert no token was
    routed to) gets, on :meth:`detach`, the range its siblings saw (the same role
    in the other experts or layers), never the uninitialised values
    compressed-tensors left.
    """

    def __init__(self, batch_index: Callable[[], int] | None = None) -> None:
        # given under a distributed run (the running batch's index in this rank's share): each
        # observation is kept to be replayed in the whole set's order (see synchronize)
        self.batch_index = batch_index
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._removers: list[Callable[[], None]] = []
        self._observed: list[_Observed] = []
        self._last: tuple[Any, ...] | None = None
        self._last_statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(
        self,
        module: torch.nn.Module,
        observing: Callable[[], bool] = lambda: True,
        name: str | None = None,
    ) -> None:
        scheme = module.quantization_scheme
        tap = kv_cache_tap(module)
        if tap is not None:  # an attention module: its keys and values (and queries, if tapped)
            bases = ("q", "k", "v") if has_query_tap(module) else ("k", "v")
            values = [(base, scheme.input_activations) for base in bases]
        else:
            values = [("input", scheme.input_activations), ("output", scheme.output_activations)]
        for base, args in values:
            if args is None or args.dynamic is True:
                continue
            check_observable(base, args)
            entry = _Observed(name or f"<module {id(module)}>", module, base, args, make_observer(args, base))
            if self.batch_index is not None:
                entry.history = []
            self._observed.append(entry)

            def record(mod: torch.nn.Module, value: torch.Tensor, entry: _Observed = entry) -> None:
                if not observing() or value.numel() == 0:  # nothing routed here: nothing to fold in
                    return
                statistics = self._statistics(value, entry)
                if entry.history is not None and self.batch_index is not None:
                    entry.history.append((self.batch_index(), *statistics))
                entry.observer.combine(*statistics)
                _write_activation_qparams(mod, entry.base, entry.args, entry.observer.min, entry.observer.max)

            if tap is not None:
                self._removers.append(register_query_hook(module, record) if base == "q" else tap.register(base, record))
                continue
            if base == "input":
                handle = module.register_forward_pre_hook(input_only(lambda m, a, record=record: record(m, a[0])))
            else:
                handle = module.register_forward_hook(lambda m, a, out, record=record: record(m, out))
            self._handles.append(handle)

    def _statistics(self, value: torch.Tensor, entry: _Observed) -> tuple[torch.Tensor, torch.Tensor]:
        """One observation's statistics, computed once for modules fed the very same
        tensor in a row with the same arguments and observer (q/k/v, gate/up, every
        expert when all see every token)."""
        key = (value._version, entry.base, type(entry.observer), entry.args)
        last = self._last
        if last is None or last[0] is not value or last[1:] != key:
            observed = flatten_for_calibration(value.detach(), entry.base, entry.args)
            self._last, self._last_statistics = (value, *key), entry.observer.statistics(observed)
        assert self._last_statistics is not None
        return self._last_statistics

    def synchronize(self, prefix: str = "") -> None:
        """Under a distributed run, make every rank's observers under ``prefix`` what one
        process would have made of the whole calibration set: each rank's observations are
        gathered and replayed, fresh, in the whole set's batch order (rank ``r``'s batch ``k``
        is batch ``k * ranks + r``, see :class:`llmc.distributed.RankShard`), so any observer
        (moving averages included) gets the single-process result. Collective: every rank
        calls it with the same prefix; entries already synchronized are skipped."""
        entries = [e for e in self._observed if e.name.startswith(prefix) and e.history is not None]
        if not entries:
            return
        local = [[(k, lo.cpu(), hi.cpu()) for k, lo, hi in e.history] for e in entries]  # type: ignore[union-attr]
        gathered = distributed.all_gather_object(local)
        ranks = len(gathered)
        for i, entry in enumerate(entries):
            device = next((t.device for _, t, _ in entry.history or []), None)  # type: ignore[misc]
            observations = sorted(
                ((k * ranks + r, lo, hi) for r, per_rank in enumerate(gathered) for k, lo, hi in per_rank[i]),
                key=lambda o: o[0],
            )
            entry.history = None
            if not observations:
                continue
            device = device or next(entry.module.parameters()).device
            entry.observer = make_observer(entry.args, entry.base)
            for _, lo, hi in observations:
                entry.observer.combine(lo.to(device), hi.to(device))
            _write_activation_qparams(entry.module, entry.base, entry.args, entry.observer.min, entry.observer.max)

    def ranges(self, prefix: str) -> dict[str, torch.Tensor]:
        """The ranges observed so far of every value of the modules under ``prefix`` (a
        finished layer's, which a resumed run restores with :meth:`restore`)."""
        kept: dict[str, torch.Tensor] = {}
        for entry in self._observed:
            if entry.name.startswith(prefix) and entry.observer.seen:
                kept[f"{entry.name}.{entry.base}.min"] = entry.observer.min
                kept[f"{entry.name}.{entry.base}.max"] = entry.observer.max
        return kept

    def restore(self, ranges: dict[str, torch.Tensor], device: torch.device) -> None:
        """Ranges :meth:`ranges` gave, as if observed on ``device`` (the module's qparams are
        restored apart)."""
        for entry in self._observed:
            key = f"{entry.name}.{entry.base}"
            if f"{key}.min" in ranges:
                entry.observer.min = ranges[f"{key}.min"].to(device)
                entry.observer.max = ranges[f"{key}.max"].to(device)

    def detach(self) -> None:
        self.synchronize()
        for handle in self._handles:
            handle.remove()
        for remove in self._removers:
            remove()
        self._handles.clear()
        self._removers.clear()
        self._last = self._last_statistics = None
        self._fill_unobserved()
        self._observed.clear()

    def _fill_unobserved(self) -> None:
        unseen = [entry for entry in self._observed if not entry.observer.seen]
        if not unseen:
            return
        ranges: dict[tuple[str, str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
        for entry in self._observed:
            observer = entry.observer
            if observer.seen:
                key = _role(entry)
                lo, hi = ranges.get(key, (observer.min, observer.max))
                ranges[key] = (torch.minimum(lo, observer.min), torch.maximum(hi, observer.max))
        for entry in unseen:
            found = ranges.get(_role(entry))
            if found is None:
                logger.warning(
                    "%s saw no calibration data and no module in its role did: its static %s "
                    "scale is set for the range [-1, 1].", entry.name, entry.base
                )
                found = (torch.tensor([-1.0]), torch.tensor([1.0]))
            else:
                logger.warning(
                    "%s saw no calibration data: its static %s scale takes the range its "
                    "siblings (%s) saw.", entry.name, entry.base, sibling_key(entry.name)
                )
            _write_activation_qparams(entry.module, entry.base, entry.args, *found)  # _copy moves it


def freeze(modules: Iterable[tuple[str, torch.nn.Module]]) -> None:
    for _, module in modules:
        module.quantization_status = QuantizationStatus.FROZEN
