"""How transformers lays out fused expert weights, and how to cut one expert out of them.

transformers 5 holds an MoE layer's experts as 3-D parameters, ``gate_up_proj``
(or ``up_proj`` when the experts have no gate) and ``down_proj``, each indexed by
expert first. Four flags describe every such layout (transformers sets them with
``use_experts_implementation``): whether a gate exists, whether the matrices are
stored input-major (``x @ W`` instead of ``W @ x``), whether gate and up are
concatenated (``[gate; up]``) or interleaved (``gate0, up0, gate1, ...``), and
whether there are biases. :meth:`FusedLayout.expert` applies them, for a loaded
model (linearization) and for a checkpoint's tensors (``model_free_ptq``) alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
import torch

GATE, UP, DOWN = "gate", "up", "down"
# the fused parameters of one experts module, by their attribute names
FUSED_NAMES = ("gate_up_proj", "up_proj", "down_proj")
BIAS_SUFFIX = "_bias"


@attrs.frozen
class FusedLayout:
    gated: bool = True
    transposed: bool = False
    concatenated: bool = True
    biased: bool = False

    @classmethod
    def of(cls, module: torch.nn.Module) -> FusedLayout | None:
        """The layout of a transformers experts module, or None when ``module`` is not one.

        Modules decorated with ``use_experts_implementation`` carry the flags; an
        undecorated module with the same parameters (Llama 4's) is recognised by its
        shapes: ``gate_up_proj`` is (experts, hidden, 2·intermediate) there.
        """
        params = dict(module.named_parameters(recurse=False))
        first = params.get("gate_up_proj", params.get("up_proj"))
        down = params.get("down_proj")
        if first is None or down is None or first.ndim != 3 or down.ndim != 3:
            return None
        if hasattr(module, "is_transposed"):
            return cls(
                gated=bool(getattr(module, "has_gate", True)),
                transposed=bool(module.is_transposed),
                concatenated=bool(getattr(module, "is_concatenated", True)),
                biased=bool(getattr(module, "has_bias", False)),
            )
        # undecorated: input-major when the first projection's rows are down_proj's columns
        # (hidden) and its columns are not down_proj's rows (the ambiguous square case is not)
        transposed = first.shape[1] == down.shape[2] and first.shape[2] != down.shape[1]
        return cls(
            gated="gate_up_proj" in params,
            transposed=transposed,
            concatenated=True,
            biased=f"{'gate_up_proj' if 'gate_up_proj' in params else 'up_proj'}{BIAS_SUFFIX}" in params,
        )

    @property
    def first(self) -> str:
        """Name of the fused parameter that holds the input projections."""
        return "gate_up_proj" if self.gated else "up_proj"

    def _matrix(self, fused: torch.Tensor, index: int) -> torch.Tensor:
        """Expert ``index``'s matrix as a Linear holds it: (out, in)."""
        w = fused[index]
        return w.t() if self.transposed else w

    def _halves(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up rows (or entries, for a bias) of a fused gate/up projection."""
        if self.concatenated:
            half = rows.shape[0] // 2
            return rows[:half], rows[half:]
        return rows[0::2], rows[1::2]

    def split(self, param: str, fused: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """Expert ``index``'s share of one fused parameter (``gate_up_proj``, ``down_proj``,
        or a ``..._bias``), by role (gate, up, down): views of ``fused``, weights shaped (out, in)
        as a Linear holds them."""
        bias = param.endswith(BIAS_SUFFIX)
        base = param.removesuffix(BIAS_SUFFIX)
        piece = fused[index] if bias else self._matrix(fused, index)
        if base == "down_proj":
            return {DOWN: piece}
        if base != self.first:
            raise KeyError(f"{param!r} is not a fused parameter of this layout ({self.first}, down_proj)")
        if not self.gated:
            return {UP: piece}
        gate, up = self._halves(piece)
        return {GATE: gate, UP: up}

    def expert(
        self, fused: Mapping[str, torch.Tensor], index: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Expert ``index``'s (weight, bias) per role, from the module's fused parameters by name."""
        weights: dict[str, torch.Tensor] = {}
        biases: dict[str, torch.Tensor] = {}
        for param in (self.first, "down_proj"):
            weights.update(self.split(param, fused[param], index))
            if self.biased:
                biases.update(self.split(param + BIAS_SUFFIX, fused[param + BIAS_SUFFIX], index))
        return {role: (weight, biases.get(role)) for role, weight in weights.items()}

    def parameters(self) -> tuple[str, ...]:
        """Names of the fused parameters this layout has."""
        names = (self.first, "down_proj")
        return names + tuple(n + BIAS_SUFFIX for n in names) if self.biased else names

    def num_experts(self, fused: Mapping[str, torch.Tensor]) -> int:
        return fused[self.first].shape[0]


@attrs.frozen
class ProjectionNames:
    """The names one expert's projections have in the family's original checkpoints."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # whether transformers converts these names into its fused experts when it loads them
    reloadable: bool = attrs.field(default=False, eq=False)

    def of(self, role: str) -> str:
        return {GATE: self.gate, UP: self.up, DOWN: self.down}[role]


_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


def _patterns(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def projection_names(model: torch.nn.Module) -> ProjectionNames:
    """Per-expert projection names from the weight conversions transformers uses to load the
    family's checkpoints (Mixtral's ``w1``/``w3``/``w2``, Qwen's ``gate_proj``/...): saved under
    these, a linearized model has its original checkpoint's keys. Families whose checkpoints
    are fused themselves (gpt-oss, Llama 4) get ``gate_proj``/``up_proj``/``down_proj``."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = get_model_conversion_mapping(model, add_legacy=False)
        except Exception:  # not a transformers model, or a transformers without the mapping
            conversions = []
    found: dict[str, str] = {}
    for conversion in conversions:
        targets = _patterns(getattr(conversion, "_original_target_patterns", conversion.target_patterns))
        sources = _patterns(getattr(conversion, "_original_source_patterns", conversion.source_patterns))
        leaves = [m.group(1) for m in (_SOURCE.search(s) for s in sources) if m]
        if len(targets) != 1 or len(leaves) != len(sources):
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(leaves) == 2:
            found.setdefault(GATE, leaves[0])
            found.setdefault(UP, leaves[1])
        elif targets[0].endswith("experts.up_proj") and len(leaves) == 1:
            found.setdefault(UP, leaves[0])
        elif targets[0].endswith("experts.down_proj") and len(leaves) == 1:
            found.setdefault(DOWN, leaves[0])
    return ProjectionNames(**found, reloadable=bool(found))
