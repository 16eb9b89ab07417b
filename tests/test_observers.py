"""Quantization parameters against a direct reference computation."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.quantization.calibrate import fused_global_scales
from llmc.quantization.observers import MinMaxObserver, reduce_min_max, weight_qparams


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
    with pytest.raises(ValueError, match="not supported"):
        reduce_min_max(torch.zeros(4, 4), args)


def test_min_max_observer_accumulates():
    obs = MinMaxObserver()
    assert not obs.seen
    obs.update(torch.tensor([1.0, -2.0]))
    obs.update(torch.tensor([3.0, 0.5]))
    assert obs.min.item() == -2.0 and obs.max.item() == 3.0


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
