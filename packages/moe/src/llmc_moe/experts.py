"""Experts as one ``nn.Linear`` per expert and projection, with the fused module's forward.

:class:`LinearExperts` replaces a transformers experts module: the same call
(hidden states, top-k expert indices, top-k weights), the same output, but every
projection is a ``Linear`` that quantization schemes target, observers and
Hessian hooks see, and the saver writes under the checkpoint's per-expert names.

With ``all_experts`` set (during calibration, see :mod:`llmc_moe.patch`) every
expert runs on every token, so each one's observers and Hessians see the whole
calibration set, while only the routed results make the output: the next layer
still sees the model's true activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmc.naming import RECIPE_NAME
from llmc_moe import stacked
from llmc_moe.layout import DOWN, GATE, UP, FusedLayout, ProjectionNames

STANDARD = ProjectionNames()  # gate_proj, up_proj, down_proj: transformers' and llm-compressor's

Gate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (expert indices, routing weights, expert outputs) of the routed (token, slot) pairs of one call
RoutedHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def contiguous_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A row-major copy: a transposed slice of a fused weight would otherwise keep its strides."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear that owns a copy of ``weight`` (and ``bias``): no fused storage kept alive."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(contiguous_copy(weight), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(contiguous_copy(bias), requires_grad=False)
    return linear


class ExpertMLP(nn.Module):
    """One expert: its projections as Linear modules under the checkpoint's names."""

    def __init__(self, names: ProjectionNames, projections: dict[str, nn.Linear], gate: Gate | None, act: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        super().__init__()
        self._roles = {role: names.of(role) for role in projections}
        for role, linear in projections.items():
            self.add_module(names.of(role), linear)
            if names.of(role) != STANDARD.of(role):  # what llm-compressor's recipes call it
                setattr(linear, RECIPE_NAME, STANDARD.of(role))
        self._gate = gate  # (gate, up) -> activation, when the expert is gated
        self._act = act  # up -> activation, when it is not

    def projection(self, role: str) -> nn.Linear:
        return getattr(self, self._roles[role])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.projection(UP)(x)
        if self._gate is not None:
            hidden = self._gate(self.projection(GATE)(x), up)
        else:
            assert self._act is not None
            hidden = self._act(up)
        return self.projection(DOWN)(hidden)


def gate_function(fused: nn.Module, layout: FusedLayout) -> Gate | None:
    """How the fused module turns (gate, up) into the down projection's input.

    transformers' default is ``act(gate) * up``; a family may define its own
    ``_apply_gate`` on the fused [gate; up] (or interleaved) vector (gpt-oss clamps
    and offsets it), which is then called on the recombined halves.
    """
    if not layout.gated:
        return None
    apply = getattr(type(fused), "_apply_gate", None)
    default = None
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # a transformers without the experts interface
        pass
    act = fused.act_fn if hasattr(fused, "act_fn") else None
    if apply is None or apply is default:
        assert act is not None, f"{type(fused).__name__} has neither _apply_gate nor act_fn"
        return lambda gate, up: act(gate) * up
    if layout.concatenated:
        return lambda gate, up: apply(fused, torch.cat([gate, up], dim=-1))
    return lambda gate, up: apply(fused, torch.stack([gate, up], dim=-1).flatten(-2))


# elements of one chunk's stacked inputs or outputs (modules x tokens x hidden) in the stacked path
_STACK_ELEMENTS = 2**28


class LinearExperts(nn.ModuleList):
    """Calibratable replacement of a fused experts module (see the module doc).

    ``scale_inputs``: the routing weight multiplies an expert's input instead of its
    output (Llama 4). ``tokens_seen[e]`` counts the tokens expert ``e`` ran on,
    ``tokens_total`` the tokens the module was called with, since the last reset.
    ``routed_hooks`` are called on every call with the routed pairs' expert indices, routing
    weights and the experts' outputs before weighting (see :data:`RoutedHook`); a hook cannot
    see Llama 4's, whose weights scale the inputs.
    """

    def __init__(
        self,
        experts: list[ExpertMLP],
        *,
        post_norm: nn.Module | None = None,
        scale_inputs: bool = False,
        source: str = "",
        stacks: stacked.WeightStacks | None = None,
    ) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        if post_norm is not None:
            self.post_expert_norm = post_norm
        self.scale_inputs = scale_inputs
        self.source = source  # the class it replaced, for messages
        self.all_experts = False
        self.routed_hooks: list[RoutedHook] = []
        self._stacks = stacks if stacks is not None else stacked.WeightStacks()
        self.reset_counts()

    @classmethod
    def from_fused(
        cls,
        fused: nn.Module,
        layout: FusedLayout,
        names: ProjectionNames,
        scale_inputs: bool = False,
        stacks: stacked.WeightStacks | None = None,
    ) -> LinearExperts:
        params = {n: p.data for n, p in fused.named_parameters(recurse=False)}
        gate = gate_function(fused, layout)
        act = None if layout.gated else fused.act_fn
        experts = []
        for index in range(layout.num_experts(params)):
            projections = {
                role: _linear(weight, bias) for role, (weight, bias) in layout.expert(params, index).items()
            }
            experts.append(ExpertMLP(names, projections, gate, act))
        post_norm = fused.post_expert_norm if getattr(fused, "has_post_expert_norm", False) else None
        return cls(
            experts, post_norm=post_norm, scale_inputs=scale_inputs, source=type(fused).__name__, stacks=stacks
        )

    def keep(self, retained: list[int]) -> None:
        """Keep only the experts ``retained`` (indices, in order), renumbered from 0 (expert
        pruning: the router must be cut to the same rows)."""
        others = {k: m for k, m in self._modules.items() if not k.isdigit()}  # a post-expert norm
        experts = [self[i] for i in retained]
        self._modules.clear()
        self._modules.update({str(i): expert for i, expert in enumerate(experts)})
        self._modules.update(others)
        self.num_experts = len(experts)
        self.clear_stacks()
        self.reset_counts()

    def reset_counts(self) -> None:
        self.tokens_seen = [0] * self.num_experts
        self.tokens_total = 0

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.all_experts and not self.scale_inputs and all(stacked.stackable(m) for m in self._linears()):
            return self._forward_stacked(hidden_states, top_k_index, top_k_weights)
        return self._forward_each(hidden_states, top_k_index, top_k_weights)

    def _linears(self) -> Iterator[nn.Linear]:
        for expert in self:
            yield from (expert.projection(role) for role in expert._roles)

    def clear_stacks(self) -> None:
        """Drop the stacked weights kept between calls (see :class:`stacked.WeightStacks`)."""
        self._stacks.clear()

    def _forward_stacked(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """All experts on all tokens in batched matmuls (see :mod:`llmc_moe.stacked`)."""
        out = torch.zeros_like(x)
        tokens = x.shape[0]
        experts = list(self)
        gated = GATE in experts[0]._roles
        chunk = max(1, _STACK_ELEMENTS // max(1, 2 * tokens * x.shape[-1]))
        for start in range(0, self.num_experts, chunk):
            part = experts[start : start + chunk]
            ups = [e.projection(UP) for e in part]
            gates = [e.projection(GATE) for e in part] if gated else []
            for i, up in enumerate(ups):  # the order ExpertMLP.forward calls them in
                stacked.pre_hooks(up, (x,))
                if gated:
                    stacked.pre_hooks(gates[i], (x,))
            first = gates + ups
            projected = self._project(first, x, (start, "first"), shared=True)
            gate_out, up_out = (projected[: len(part)], projected[len(part) :]) if gated else (None, projected)
            for i, up in enumerate(ups):
                stacked.post_hooks(up, (x,), up_out[i])
                if gated:
                    stacked.post_hooks(gates[i], (x,), gate_out[i])
            hidden = part[0]._gate(gate_out, up_out) if gated else part[0]._act(up_out)
            downs = [e.projection(DOWN) for e in part]
            for i, down in enumerate(downs):
                stacked.pre_hooks(down, (hidden[i],))
            y = self._project(downs, hidden, (start, "down"), shared=False)
            for i, down in enumerate(downs):
                stacked.post_hooks(down, (hidden[i],), y[i])
            norm = getattr(self, "post_expert_norm", None)
            if norm is not None:
                y = norm(y)
            # the routed (token, slot) pairs whose expert is in this chunk
            local = top_k_index - start
            chosen = (local >= 0) & (local < len(part))
            token_idx, slot = chosen.nonzero(as_tuple=True)
            picked = y[local[token_idx, slot], token_idx]
            weights = top_k_weights[token_idx, slot]
            for hook in self.routed_hooks:
                hook(top_k_index[token_idx, slot], weights, picked)
            out.index_add_(0, token_idx, (picked * weights[:, None]).to(out.dtype))
        self.tokens_seen = [seen + tokens for seen in self.tokens_seen]
        self.tokens_total += tokens
        return out

    def _project(
        self, modules: list[nn.Linear], x: torch.Tensor, key: tuple[int, str], shared: bool
    ) -> torch.Tensor:
        """(modules, tokens, out): ``x`` (shared, or one input per module) through each module
        as its forward would compute it, fake quantization included."""
        weights = self._stacks.get(self, key, modules)
        inputs: torch.Tensor | list[torch.Tensor] = x
        if any(stacked.quantizes_input(m) for m in modules):
            every = all(stacked.quantizes_input(m) for m in modules)
            if shared and every and stacked.same_input_quantization(modules):
                inputs = stacked.quantized(modules[0], x, "input")
            elif not shared and every:
                inputs = stacked.quantized_inputs(modules, x)
            else:
                inputs = [stacked.quantized(m, x if shared else x[i], "input") for i, m in enumerate(modules)]
                shared = False
        y = stacked.project(inputs, weights, stacked.bias(modules), shared)
        if any(stacked.quantizes_output(m) for m in modules):
            y = torch.stack([stacked.quantized(m, y[i], "output") for i, m in enumerate(modules)])
        return y

    def _forward_each(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        tokens = hidden_states.shape[0]
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = flat.argsort(stable=True)
        # one host sync for the whole call: how many (token, slot) pairs each expert got
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        routed_tokens = order // top_k
        routed_weights = top_k_weights.reshape(-1)[order]
        norm = getattr(self, "post_expert_norm", None)
        start = 0
        for index, expert in enumerate(self):
            count = counts[index]
            token_idx = routed_tokens[start : start + count]
            weights = routed_weights[start : start + count, None]
            start += count
            if self.all_experts:
                x = hidden_states
                if self.scale_inputs and count:
                    x = x.index_copy(0, token_idx, x[token_idx] * weights.to(x.dtype))
                y = expert(x)[token_idx]
                self.tokens_seen[index] += tokens
            elif count:
                x = hidden_states[token_idx]
                y = expert(x * weights.to(x.dtype) if self.scale_inputs else x)
                self.tokens_seen[index] += count
            else:
                continue
            if norm is not None:
                y = norm(y)
            if not self.scale_inputs:
                for hook in self.routed_hooks:
                    hook(torch.full_like(token_idx, index), weights[:, 0], y)
                y = y * weights
            out.index_add_(0, token_idx, y.to(out.dtype))
        self.tokens_total += tokens
        return out

    def extra_repr(self) -> str:
        return f"linearized {self.source}, all_experts={self.all_experts}"
