"""Quantization parameters against a direct reference computation."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.quantization.calibrate import fused_global_scales
from llmc.quantization.observers import weight_qparams


def _weight(seed: int, rows: int = 64, cols: int = 256) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_symmetric_int_group_scale(seed):
    w = _weight(seed)
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    scale, zp = weight_qparams(w, args)
    absmax = w.reshape(64, 2, 128).abs().amax(-1)
    torch.testing.assert_close(scale, absmax / 7.5)  # int4 range [-8, 7] spans 15 steps
    assert torch.all(zp == 0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_asymmetric_int_group_scale(seed):
    w = _weight(seed) + 0.02  # off-centre, so asymmetry matters
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    scale, zp = weight_qparams(w, args)
    g = w.reshape(64, 2, 128)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    torch.testing.assert_close(scale, (hi - lo) / 15)
    torch.testing.assert_close(zp.float(), torch.clamp(torch.round(-8 - lo / ((hi - lo) / 15)), -8, 7))


def test_fp8_channel_and_block_scales():
    w = _weight(1, rows=200, cols=256)
    channel = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    scale, _ = weight_qparams(w, channel)
    torch.testing.assert_close(scale, w.abs().amax(-1, keepdim=True) / 448.0)

    block = preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights
    scale, _ = weight_qparams(w, block)
    assert scale.shape == (2, 2)  # ragged last row block is padded, not dropped
    expected = torch.stack([
        torch.stack([w[r:r + 128, c:c + 128].abs().max() for c in (0, 128)]) for r in (0, 128)
    ]) / 448.0
    torch.testing.assert_close(scale, expected)


def test_unsupported_strategy_is_refused():
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations  # token strategy
    with pytest.raises(ValueError, match="not supported for weights"):
        weight_qparams(torch.zeros(4, 4), args)


# --- observers against a direct computation of what each one means ----------------------


def _batches(seed: int, n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # ranges that differ from batch to batch, off-centre, so every observer disagrees
    # the widest batch in the middle: a range that forgets the past is told apart
    spread = [1.0, 6.0, 2.0, 3.0, 1.5, 2.5]
    return [torch.randn(2, 5, 16, generator=g) * spread[i % 6] + 0.3 * i for i in range(n)]


def _static_fp8(**input_args) -> dict:
    """config_groups of static FP8 inputs, without the preset's own observer choice."""
    args = {"num_bits": 8, "type": "float", "strategy": "tensor", **input_args}
    return {"g": {"targets": ["Linear"], "input_activations": args}}


def _observed_input_scale(batches: list[torch.Tensor], **modifier_args) -> torch.Tensor:
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    from llmc.modifiers.quantization import QuantizationModifier
    from llmc.quantization.calibrate import ActivationObservers

    modifier = QuantizationModifier(**{"config_groups": _static_fp8(), **modifier_args})
    module = torch.nn.Linear(16, 8, bias=False)
    initialize_module_for_quantization(module, next(iter(modifier.config.config_groups.values())))
    observers = ActivationObservers()
    observers.attach(module, name="layer")
    with torch.no_grad():
        for x in batches:
            module(x)
    observers.detach()
    return module.input_scale.detach().clone()


def _fp8_scale(lo: float, hi: float) -> torch.Tensor:
    return torch.tensor([max(abs(lo), abs(hi)) / 448.0])


def _moving_average(ranges: list[tuple[float, float]], constant: float = 0.01) -> tuple[float, float]:
    lo, hi = ranges[0]
    for a, b in ranges[1:]:
        lo, hi = (1 - constant) * lo + constant * a, (1 - constant) * hi + constant * b
    return lo, hi


@pytest.mark.parametrize("seed", [0, 1])
def test_activation_minmax_observers(seed):
    batches = _batches(seed)
    ranges = [(float(x.min()), float(x.max())) for x in batches]
    extremes = _fp8_scale(min(r[0] for r in ranges), max(r[1] for r in ranges))
    # static_minmax: every batch's extremes (the FP8 preset's own choice)
    torch.testing.assert_close(_observed_input_scale(batches, input_observer="static_minmax"), extremes)
    torch.testing.assert_close(_observed_input_scale(batches, config_groups=None, scheme="FP8"), extremes)
    # memoryless_minmax: the last batch only
    torch.testing.assert_close(_observed_input_scale(batches, observer={"input": "memoryless_minmax"}),
                               _fp8_scale(*ranges[-1]))
    # minmax (an activation's default): moving averages of min and max, constant 0.01
    torch.testing.assert_close(_observed_input_scale(batches), _fp8_scale(*_moving_average(ranges)))
    # the averaging constant comes from the scheme's observer_kwargs
    groups = _static_fp8(observer="minmax", observer_kwargs={"averaging_constant": 0.5})
    torch.testing.assert_close(_observed_input_scale(batches, config_groups=groups),
                               _fp8_scale(*_moving_average(ranges, 0.5)))


def _reference_shrink(x: torch.Tensor, quantize, steps: int = 20, grid: float = 100.0,
                      norm: float = 2.4, patience: int = 5) -> torch.Tensor:
    """Per row of ``x`` (groups, elements): the shrink factor p = 1 - i / grid whose
    quantization error sum |q - x| ** norm is least, searching until ``patience`` steps in a
    row improve no row; ``quantize(x, p)`` fake-quantizes every row with its range times p."""
    best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    chosen = torch.ones(x.shape[0], dtype=torch.float64)
    stale = 0
    for i in range(steps):
        p = 1 - i / grid
        error = (quantize(x, p) - x).abs().double().pow(norm).sum(-1)
        better = error < best
        if better.any():
            best[better], chosen[better], stale = error[better], p, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return chosen


def test_weight_mse_observer_searches_each_groups_clipping_range():
    from llmc.modifiers.quantization import QuantizationModifier

    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    w[:, ::37] *= 6  # outliers: clipping them pays off in some groups, not in others
    for argument in ({"weight_observer": "mse"}, {"observer": {"weights": "memoryless_mse"}}):
        args = QuantizationModifier(scheme="W4A16", **argument).config.config_groups["group_0"].weights
        scale, _ = weight_qparams(w, args)
        groups = w.reshape(-1, 128)
        absmax = groups.abs().amax(-1, keepdim=True)

        def int4(x: torch.Tensor, p: float, absmax: torch.Tensor = absmax) -> torch.Tensor:
            s = absmax * p / 7.5
            return torch.clamp(torch.round(x / s), -8, 7) * s

        p = _reference_shrink(groups, int4).float()
        torch.testing.assert_close(scale.reshape(-1), (absmax.reshape(-1) * p / 7.5))
        assert (p < 1).any() and (p == 1).any()  # the search did choose, differently per group
    plain, _ = weight_qparams(w, QuantizationModifier(scheme="W4A16").config.config_groups["group_0"].weights)
    assert not torch.equal(plain, scale)


def test_nvfp4_expanded_mse_searches_from_an_expanded_range():
    """llm-compressor's ``nvfp4_expanded_mse``: the MSE search from 1.8 times each group's range
    down to 0.8 times it, 1/200 a step, no early stop (here on int4 groups, written out)."""
    from llmc.modifiers.quantization import QuantizationModifier

    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    w[:, ::37] *= 6
    args = QuantizationModifier(scheme="W4A16", weight_observer="nvfp4_expanded_mse").config.config_groups["group_0"].weights
    groups = w.reshape(-1, 128)
    absmax = groups.abs().amax(-1, keepdim=True) * 1.8

    def int4(x: torch.Tensor, p: float) -> torch.Tensor:
        s = absmax * p / 7.5
        return torch.clamp(torch.round(x / s), -8, 7) * s

    p = _reference_shrink(groups, int4, steps=int((1 - 0.8 / 1.8) * 200), grid=200.0, patience=1000).float()
    scale, _ = weight_qparams(w, args)
    torch.testing.assert_close(scale.reshape(-1), absmax.reshape(-1) * p / 7.5)
    assert len(set(p.tolist())) > 1  # the search chose, differently per group


def test_imatrix_mse_weighs_each_columns_error_by_its_importance():
    """llm-compressor's ``imatrix_mse``: the MSE search (norm 3, grid 20, down to 0.05) with
    each column's error times its input channel's importance (normalised to mean 1)."""
    from llmc.modifiers.quantization import QuantizationModifier

    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(5))
    w[:, ::37] *= 6
    importance = torch.rand(256, generator=torch.Generator().manual_seed(6)) ** 4
    args = QuantizationModifier(scheme="W4A16", weight_observer="imatrix_mse").config.config_groups["group_0"].weights
    groups = w.reshape(-1, 128)
    weights = (importance / importance.mean()).expand(32, 256).reshape(-1, 128)
    absmax = groups.abs().amax(-1, keepdim=True)

    def int4(x: torch.Tensor, p: float) -> torch.Tensor:
        s = absmax * p / 7.5
        return torch.clamp(torch.round(x / s), -8, 7) * s

    def weighted(x: torch.Tensor, p: float) -> torch.Tensor:  # |q - x|^3 * importance, as an error
        return x + (int4(x, p) - x) * weights ** (1 / 3)

    p = _reference_shrink(groups, weighted, steps=20, grid=20.0, norm=3.0).float()
    scale, _ = weight_qparams(w, args, importance=importance)
    torch.testing.assert_close(scale.reshape(-1), absmax.reshape(-1) * p / 7.5)
    uniform, _ = weight_qparams(w, args)  # without importance every column weighs the same
    assert not torch.equal(scale, uniform)
    p_uniform = _reference_shrink(groups, int4, steps=20, grid=20.0, norm=3.0).float()
    torch.testing.assert_close(uniform.reshape(-1), absmax.reshape(-1) * p_uniform / 7.5)


def test_imatrix_importance_is_the_mean_square_of_each_modules_inputs(llama_path):
    """QuantizationModifier with ``imatrix_mse`` calibrates on data (sequential pipeline) and
    sets each weight's range from its inputs' mean squares: layer 0's q_proj, whose input no
    quantization changes, against the importance computed directly on the original model."""
    from transformers import AutoModelForCausalLM

    from llmc import oneshot
    from llmc.args import DatasetArguments
    from llmc.data import build_calibration_dataloader
    from llmc.modifiers.quantization import QuantizationModifier
    from llmc.tiny import build_tokenizer

    data = dict(dataset="llmc-docs", num_calibration_samples=8, max_seq_length=32)
    modifier = QuantizationModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"], weight_observer="imatrix_mse")
    assert modifier.needs_data() and modifier.pipeline() == "sequential"
    model = oneshot(model=str(llama_path), recipe=[modifier], **data)

    original = AutoModelForCausalLM.from_pretrained(llama_path)
    q_proj = original.model.layers[0].self_attn.q_proj
    squares = []
    handle = q_proj.register_forward_pre_hook(lambda m, args: squares.append(args[0].reshape(-1, args[0].shape[-1]).pow(2)))
    with torch.no_grad():
        for batch in build_calibration_dataloader(DatasetArguments(**data), build_tokenizer(2048)):
            original(**batch)
    handle.remove()
    importance = torch.cat(squares).mean(dim=0)
    args = modifier.config.config_groups["group_0"].weights
    expected, _ = weight_qparams(q_proj.weight, args, importance=importance)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight_scale, expected.to(torch.float32))
    uniform, _ = weight_qparams(q_proj.weight, args)
    assert not torch.equal(expected, uniform)


def test_mse_search_stops_after_patience_steps_that_improve_nothing():
    """One int4 group whose error, over the shrink steps, improves again only after more than
    ``patience`` steps that did not: the observer must stop where the reference does."""
    from llmc.modifiers.quantization import QuantizationModifier

    args = QuantizationModifier(scheme="W4A16", weight_observer="mse").config.config_groups["group_0"].weights
    w = torch.randn(1, 128, generator=torch.Generator().manual_seed(12))
    absmax = w.abs().amax(-1, keepdim=True)

    def int4(x: torch.Tensor, p: float) -> torch.Tensor:
        s = absmax * p / 7.5
        return torch.clamp(torch.round(x / s), -8, 7) * s

    patient, exhaustive = _reference_shrink(w, int4), _reference_shrink(w, int4, patience=100)
    assert patient != exhaustive  # this group tells the two apart
    scale, _ = weight_qparams(w, args)
    torch.testing.assert_close(scale.reshape(-1), absmax.reshape(-1) * patient.float() / 7.5)


def test_activation_mse_observer_matches_a_reference_search():
    batches = _batches(5, n=3)

    def fp8(x: torch.Tensor, p: float) -> torch.Tensor:
        s = max(abs(float(x.min())), abs(float(x.max()))) * p / 448.0
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s

    shrunk = []
    for x in batches:
        flat = x.reshape(1, -1)
        shrunk.append(float(_reference_shrink(flat, fp8)[0]))
    assert min(shrunk) < 1  # the search clipped somewhere
    ranges = [(float(x.min()) * p, float(x.max()) * p) for x, p in zip(batches, shrunk, strict=True)]
    torch.testing.assert_close(_observed_input_scale(batches, input_observer="memoryless_mse"),
                               _fp8_scale(*ranges[-1]))
    torch.testing.assert_close(_observed_input_scale(batches, input_observer="mse"),
                               _fp8_scale(*_moving_average(ranges)))


def test_observer_arguments_are_checked_when_the_recipe_is_read():
    from llmc.modifiers.quantization import QuantizationModifier
    from llmc.plugins import PluginNotFoundError

    with pytest.raises(PluginNotFoundError, match="Did you mean 'minmax'"):
        QuantizationModifier(scheme="FP8", input_observer="minmaxx")
    with pytest.raises(ValueError, match="not both"):
        QuantizationModifier(scheme="FP8", input_observer="mse", observer={"weights": "mse"})
    with pytest.raises(ValueError, match="keys among"):
        QuantizationModifier(scheme="FP8", observer={"inputs": "mse"})
    # the observer chosen is recorded in the scheme, as llm-compressor writes it
    modifier = QuantizationModifier(scheme="FP8", observer={"input": "static_minmax", "weights": "MSE"})
    scheme = modifier.config.config_groups["group_0"]
    assert scheme.input_activations.observer == "static_minmax" and scheme.weights.observer == "MSE"


def test_nvfp4_fused_layers_share_global_scale():
    """q/k/v (and gate/up) must share one global scale for fused kernels."""
    from compressed_tensors.quantization import apply_quantization_config

    from llmc import tiny
    from llmc.quantization.config import build_config, resolve_config_groups

    model = tiny.build_model(tiny.build_config("llama", vocab_size=256))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(10)  # k has the widest range
    apply_quantization_config(model, build_config(resolve_config_groups("NVFP4A16", None, ["Linear"]), ["lm_head"]))
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]
    scales = fused_global_scales(modules)
    attn = "model.layers.0.self_attn."
    assert scales[attn + "q_proj"] == scales[attn + "k_proj"] == scales[attn + "v_proj"]
    assert scales[attn + "o_proj"] != scales[attn + "k_proj"]  # o_proj is not fused
    mlp = "model.layers.0.mlp."
    assert scales[mlp + "gate_proj"] == scales[mlp + "up_proj"]

    # compressed-tensors' own global scale of the group's joint range: the widest member's
    from compressed_tensors.quantization.utils import generate_gparam

    def joint(names: list[str]) -> torch.Tensor:
        w = torch.cat([model.get_submodule(n).weight.detach().flatten() for n in names])
        return generate_gparam(w.min().clamp(max=0)[None], w.max().clamp(min=0)[None])

    qkv = [attn + p for p in ("q_proj", "k_proj", "v_proj")]
    torch.testing.assert_close(scales[attn + "q_proj"].flatten(), joint(qkv).flatten(), rtol=1e-6, atol=0)
    torch.testing.assert_close(scales[attn + "o_proj"].flatten(), joint([attn + "o_proj"]).flatten(), rtol=1e-6, atol=0)

    # with it, the 10x wider k_proj quantizes as well as alone (a global scale fitted to a
    # narrower member would saturate its FP8 group scales)
    from compressed_tensors.quantization import fake_quantize

    for name in qkv:
        w = model.get_submodule(name).weight.detach()
        args = model.get_submodule(name).quantization_scheme.weights
        scale, zp = weight_qparams(w, args, scales[name])
        q = fake_quantize(w, scale, zp, args, global_scale=scales[name])
        relative = float((q - w).pow(2).sum() / w.pow(2).sum())
        assert relative < 0.05, (name, relative)


def _fp8_static_linear() -> torch.nn.Linear:
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    module = torch.nn.Linear(16, 8, bias=False)
    initialize_module_for_quantization(module, preset_name_to_scheme("FP8", ["Linear"]))
    module.input_scale.data.fill_(float("nan"))  # what uninitialised memory may hold
    return module


def test_an_expert_that_saw_no_data_takes_its_siblings_range():
    """An MoE expert no token was routed to: the widest range its siblings saw, never NaN."""
    from llmc.quantization.calibrate import ActivationObservers

    names = ["model.layers.0.mlp.experts.0.up_proj", "model.layers.0.mlp.experts.1.up_proj",
             "model.layers.1.mlp.experts.0.up_proj", "model.layers.0.self_attn.o_proj"]
    modules = {name: _fp8_static_linear() for name in names}
    observers = ActivationObservers()
    for name, module in modules.items():
        observers.attach(module, name=name)
    with torch.no_grad():
        modules[names[0]](torch.full((4, 16), -3.0))
        modules[names[2]](torch.full((4, 16), 5.0))
    observers.detach()
    seen = [modules[n].input_scale for n in names[:3]]
    torch.testing.assert_close(seen[1], torch.tensor([5.0 / 448]))  # max |x| over its role's siblings
    assert torch.equal(seen[0], torch.tensor([3.0 / 448]))  # observed modules keep their own
    fallback = modules[names[3]].input_scale  # nothing in its role saw data
    assert torch.isfinite(fallback).all() and (fallback > 0).all()


def test_an_unseen_module_takes_the_range_of_siblings_of_its_own_width():
    """Gemma 4's full attention layers have wider o_proj inputs than its sliding ones: group-wise
    (NVFP4) ranges of different widths do not combine, and an unseen module takes those of its
    role's modules of its width."""
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    from llmc.quantization.calibrate import ActivationObservers

    widths = {"model.layers.0.self_attn.o_proj": 32, "model.layers.1.self_attn.o_proj": 64,
              "model.layers.2.self_attn.o_proj": 32, "model.layers.3.self_attn.o_proj": 64}
    modules = {}
    observers = ActivationObservers()
    for name, width in widths.items():
        modules[name] = torch.nn.Linear(width, 16, bias=False)
        initialize_module_for_quantization(modules[name], preset_name_to_scheme("NVFP4", ["Linear"]))
        observers.attach(modules[name], name=name)
    names = list(widths)
    with torch.no_grad():
        modules[names[0]](torch.full((4, 32), 2.0))
        modules[names[1]](torch.full((4, 64), 7.0))
        modules[names[2]](torch.full((4, 32), 3.0))
    observers.detach()
    scales = {name: module.input_global_scale.clone() for name, module in modules.items()}
    assert torch.equal(scales[names[3]], scales[names[1]])  # the 64-wide sibling's range, 7
    assert not torch.equal(scales[names[1]], scales[names[2]])


@pytest.mark.parametrize("scheme", ["W4A16", "W8A8", "NVFP4A16"])
def test_weights_quantized_once_give_the_outputs_of_quantizing_at_every_call(scheme):
    """The sequential pipeline's propagation runs quantized weights fake-quantized once per
    layer: the model's outputs are those of fake-quantizing them at every call (activations
    still quantized per call), and the original weights come back afterwards."""
    from compressed_tensors.quantization import apply_quantization_config

    from llmc import tiny
    from llmc.quantization.calibrate import (
        calibrate_weights,
        quantization_disabled,
        weights_quantized_once,
    )
    from llmc.quantization.config import build_config, resolve_config_groups

    model = tiny.build_model(tiny.build_config("llama", vocab_size=256))
    apply_quantization_config(model, build_config(resolve_config_groups(scheme, None, ["Linear"]), ["lm_head"]))
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]
    calibrate_weights(modules)
    originals = {n: m.weight.detach().clone() for n, m in modules}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with quantization_disabled(model):
            plain = model(ids).logits
        every_call = model(ids).logits
        with weights_quantized_once(model):
            once = model(ids).logits
            changed = [n for n, m in modules if not torch.equal(m.weight, originals[n])]
        again = model(ids).logits
    assert not torch.equal(plain, every_call)  # quantization does change the outputs
    assert changed  # the weights were swapped for their fake-quantized values
    torch.testing.assert_close(once, every_call, rtol=0, atol=0)
    torch.testing.assert_close(again, every_call, rtol=0, atol=0)
    assert all(torch.equal(m.weight, originals[n]) for n, m in modules)
