"""GPTQModifier: quantize each Linear with GPTQ at the end of its sequential layer."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, ClassVar

import attrs
import torch
from compressed_tensors.quantization import ActivationOrdering, QuantizationArgs

from llmc import distributed
from llmc.lifecycle import State
from llmc.modifiers.quantization import QuantizationModifier
from llmc.quantization.calibrate import calibrate_weight, copy_into, fused_global_scales
from llmc_gptq import column_kernel, solver
from llmc_gptq.batching import plan_solves
from llmc_gptq.hessian import HessianAccumulator
from llmc_gptq.solver import gptq_quantize_batch

logger = logging.getLogger(__name__)

_ACTORDERS = {None: None, "static": ActivationOrdering.WEIGHT, "weight": ActivationOrdering.WEIGHT}


def _check_actorder(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value in ("group", "dynamic"):
        raise ValueError(
            "actorder='group' was removed from the compressed-tensors format (no g_idx since "
            "0.20); use actorder='static' (alias 'weight') or None."
        )
    if value not in _ACTORDERS:
        raise ValueError(f"actorder must be None, 'static' or 'weight', got {value!r}.")


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}.")


@attrs.define(kw_only=True)
class GPTQModifier(QuantizationModifier):
    """GPTQ (Frantar et al., 2022) over the modules a quantization scheme targets.

    Hessians of each Linear's inputs are accumulated in float32 during the
    sequential pipeline's calibration pass (shared by modules fed the same
    input), and each Linear is solved when its decoder layer ends, so the next
    layer calibrates on compressed outputs.
    """

    weights_round_to_nearest: ClassVar[bool] = False  # solved against the Hessian instead
    strength: ClassVar[int] = 2  # for `llmc demo`: GPTQ first, then AWQ, then round-to-nearest

    block_size: int = attrs.field(default=128, validator=_positive)
    dampening_frac: float = attrs.field(default=0.01, validator=_positive)
    actorder: str | None = attrs.field(default="static", validator=_check_actorder)
    offload_hessians: bool = False
    # llm-compressor's name: "auto" (or True) solves modules that share a Hessian as one matrix
    # and same-shaped matrices as one batch (see llmc_gptq.batching); False, one by one
    batched_quantization: bool | str = attrs.field(default="auto", validator=attrs.validators.in_([True, False, "auto"]))
    sequential_targets: list[str] | None = None

    _hessians: HessianAccumulator | None = attrs.field(default=None, init=False, repr=False)
    _names: dict[torch.nn.Module, str] = attrs.field(factory=dict, init=False, repr=False)
    solve_seconds: float = attrs.field(default=0.0, init=False, repr=False)
    _warm_up: threading.Thread | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        order = _ACTORDERS[self.actorder]
        for scheme in self.config.config_groups.values():
            weights = scheme.weights
            if weights is None:
                continue
            if order is not None and weights.strategy in ("group", "channel", "tensor_group") and weights.actorder is None:
                weights.actorder = order

    def pipeline(self) -> str:
        return "sequential"

    def on_initialize(self, state: State) -> None:
        super().on_initialize(state)
        self._names = {module: name for name, module in self.targeted_modules()}

    def on_calibration_start(self, state: State) -> None:
        if state.device.type == "cuda" and column_kernel.available():
            # the column kernel compiles, and the solver's libraries load, while the first
            # layer calibrates, not in its solve
            self._warm_up = threading.Thread(
                target=solver.warm_up, args=(state.device, self.block_size, self._stand_ins()), daemon=True
            )
            self._warm_up.start()
        self._hessians = HessianAccumulator(lambda: state.observing, offload=self.offload_hessians)
        for _, module in self.targeted_modules():
            if module.quantization_scheme.weights is not None:
                self._hessians.attach(module)
            # Unsolved weights have no scales yet: run them unquantized until solved.
            module.quantization_enabled = False
        self.observe_activations(state)  # static input scales, if the scheme has any

    def _stand_ins(self) -> list[tuple[int, QuantizationArgs, torch.dtype]]:
        """One stand-in solve per weight scheme and scale dtype to come (solver.warm_up), as wide
        as the narrowest such weight up to 4096 columns: the solver's libraries choose their
        kernels by size, and the stand-in's Hessian stays within 64 MB."""
        problems: dict[tuple, tuple[int, QuantizationArgs, torch.dtype]] = {}
        for _, module in self.targeted_modules():
            args = module.quantization_scheme.weights
            if args is None or not hasattr(module, "weight_scale"):
                continue
            key = (args.model_dump_json(), module.weight_scale.dtype)
            width = min(module.weight.shape[1], problems[key][0] if key in problems else 4096)
            problems[key] = (width, args, module.weight_scale.dtype)
        return list(problems.values())

    def on_batch_end(self, state: State, batch_index: int) -> None:
        if self._hessians is not None:
            self._hessians.end_batch()

    def on_sequential_layer_end(self, state: State, layer_name: str, layer: torch.nn.Module) -> None:
        super().on_sequential_layer_end(state, layer_name, layer)
        prefix = layer_name + "."
        inside = [(n, m) for n, m in self.targeted_modules() if n.startswith(prefix) and m in self._names]
        self._solve(inside)

    def on_sequential_layer_restored(
        self, state: State, layer_name: str, layer: torch.nn.Module, saved: dict[str, torch.Tensor]
    ) -> None:
        super().on_sequential_layer_restored(state, layer_name, layer, saved)
        for name, module in self.targeted_modules():
            if name.startswith(layer_name + ".") and self._names.pop(module, None) is not None:
                self.mark_quantized_weight(module)

    def on_calibration_end(self, state: State) -> None:
        # modules outside every sequential target (or all of them, on the basic pipeline)
        self._solve([(n, m) for n, m in self.targeted_modules() if m in self._names])
        if self._hessians is not None:
            self._hessians.detach()
        self._observers.detach()

    def _solve(self, modules: list[tuple[str, torch.nn.Module]]) -> None:
        """Solve ``modules``, as few solves as their Hessians allow (see :mod:`llmc_gptq.batching`).

        Under a distributed run the ranks' Hessians are summed first, each solve runs on one
        rank (spread by size) and its results are broadcast, so every rank's weights agree."""
        assert self._hessians is not None
        if self._warm_up is not None:
            self._warm_up.join()
            self._warm_up = None
        if distributed.is_distributed():
            self._hessians.synchronize([m for _, m in modules if m.quantization_scheme.weights is not None])
        # NVFP4's global scales, from the weights before any is solved (shared by a fused group)
        global_scales = fused_global_scales(modules)
        pending: list[tuple[str, torch.nn.Module]] = []
        for name, module in modules:
            self._names.pop(module, None)
            self.mark_quantized_weight(module)
            scheme = module.quantization_scheme
            if scheme.weights is None:
                continue
            if name in global_scales:
                copy_into(module, "weight_global_scale", global_scales[name])
            if self._hessians.owner.get(module) is None:
                logger.warning("%s saw no calibration data; quantizing it round-to-nearest.", name)
                calibrate_weight(module, global_scales.get(name), qparams=self.weight_qparams)
                continue
            pending.append((name, module))
        solves = plan_solves(pending, self._hessians, batched=self.batched_quantization is not False)
        owners = distributed.assign([s.cost() for s in solves])
        for solve, owner in zip(solves, owners, strict=True):
            if owner != distributed.rank():
                solve.hessians()  # another rank solves it: free them here
                continue
            started = time.perf_counter()
            results = gptq_quantize_batch(
                solve.weights(),
                [solve.hessians()],
                solve.args,
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                actorder=solve.args.actorder is not None,
                scale_dtype=solve.scale_dtype,
                global_scales=solve.global_scales(),
            )
            solve.write_back(results)
            seconds = time.perf_counter() - started
            self.solve_seconds += seconds
            for matrix, result in zip(solve.matrices, results, strict=True):
                logger.info(
                    "GPTQ %s: relative error %.3e, %.2f s (%d matrices in one solve)",
                    matrix.label, result.relative_error, seconds, len(solve.matrices),
                )
        for solve, owner in zip(solves, owners, strict=True):
            solve.broadcast(owner)
