"""WeightRounding against compressed-tensors' own round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from llmc.api import global_scale, weight_qparams
from llmc_autoround.rounding import RoundingParams, WeightRounding

SCHEMES = ["W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16", "FP8_BLOCK"]


def _args(preset: str):
    scheme: QuantizationScheme = preset_name_to_scheme(preset, ["Linear"])
    return scheme.weights


def _weight(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=generator) * 0.05
    w[3, 7] = 0.9  # an outlier widens one group's range
    return w


@pytest.mark.parametrize("preset", SCHEMES)
def test_no_offset_full_range_is_round_to_nearest(preset):
    """V = 0 and range factors 1: compressed-tensors' qparams and fake quantization exactly."""
    args = _args(preset)
    w = _weight()
    gscale = global_scale(w, args)
    other = _weight(1)[:16]  # a second weight, stacked with the first, another global scale
    gscales = [global_scale(w, args), global_scale(other, args)]
    rounding = WeightRounding.of([w, other], args, torch.float32, gscales)
    params = rounding.initial()
    scale, zero_point = rounding.qparams(params)
    exact = rounding.fake_quantize(params, straight_through=False)
    through = rounding.fake_quantize(params)
    for i, (weight, gscale) in enumerate(zip([w, other], gscales, strict=True)):
        expected_scale, expected_zp = weight_qparams(weight, args, gscale)
        torch.testing.assert_close(rounding.split(scale, qparams=True)[i], expected_scale.float(), rtol=0, atol=0)
        torch.testing.assert_close(rounding.split(zero_point, qparams=True)[i].float(), expected_zp.float(), rtol=0, atol=0)
        expected = fake_quantize(weight, expected_scale, expected_zp, args, global_scale=gscale)
        torch.testing.assert_close(exact[i], expected, rtol=0, atol=0)
        # the straight-through form has the same values, up to the float error of x + (r - x)
        torch.testing.assert_close(through[i], expected, rtol=1e-5, atol=1e-6)


def test_offsets_move_values_across_rounding_boundaries():
    """V shifts each value by V steps before rounding: +0.5 - eps rounds a value just above
    a grid point up to the next one; the range scales shrink the scale."""
    args = _args("W4A16")
    w = _weight()
    rounding = WeightRounding.of([w], args, torch.float32)
    base = rounding.initial()
    [plain] = rounding.fake_quantize(base, straight_through=False)
    scale, _ = rounding.qparams(base)
    step = rounding.split(scale, qparams=True)[0].repeat_interleave(args.group_size, dim=1)
    shifted = RoundingParams(torch.full_like(base.value, 0.49), base.min_scale, base.max_scale)
    [moved] = rounding.fake_quantize(shifted, straight_through=False)
    delta = ((moved - plain) / step).round()
    inside = (w / step).abs() < 7  # clamped at the grid's ends otherwise
    assert set(delta[inside].unique().tolist()) <= {0.0, 1.0}
    assert 0.3 < delta[inside].mean() < 0.7  # about half the values cross up
    clipped = RoundingParams(base.value, base.min_scale * 0.5, base.max_scale * 0.5)
    torch.testing.assert_close(rounding.qparams(clipped)[0], scale * 0.5)


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM", "NVFP4A16"])
def test_gradients_reach_offsets_and_range_scales(preset):
    args = _args(preset)
    w = _weight()
    rounding = WeightRounding.of([w], args, torch.float32, [global_scale(w, args)])
    params = rounding.initial()
    for t in params.tensors():
        t.requires_grad_(True)
    target = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    (rounding.fake_quantize(params)[0] @ target).pow(2).sum().backward()
    assert params.value.grad.abs().sum() > 0
    assert params.max_scale.grad.abs().sum() > 0
    # the gradient to V is the gradient to the weight times its step (straight through)
    assert params.value.grad.shape == params.value.shape


def test_scale_is_rounded_to_its_stored_dtype():
    args = _args("W4A16")
    w = _weight().to(torch.bfloat16)
    rounding = WeightRounding.of([w], args, torch.bfloat16)
    scale, _ = rounding.qparams(rounding.initial())
    assert torch.equal(scale, scale.to(torch.bfloat16).float())
    assert rounding.fake_quantize(rounding.initial())[0].dtype == torch.bfloat16


def test_block_tiles_come_back_in_place():
    """FP8_BLOCK's groups are 128 × 128 tiles (a ragged edge padded): a weight split into them
    and back is the same weight, and an offset moves only its own tile's values."""
    w = _weight()  # 48 × 256: one row of two tiles, the rows padded from 48 to 128
    rounding = WeightRounding.of([w], _args("FP8_BLOCK"), torch.float32)
    assert rounding.grouped.shape == (2, 128 * 128)
    torch.testing.assert_close(rounding.split(rounding.grouped)[0], w, rtol=0, atol=0)
    params = rounding.initial()
    params.value[1] = 0.49  # the second tile: columns 128-255
    [moved] = rounding.fake_quantize(params, straight_through=False)
    [plain] = rounding.fake_quantize(rounding.initial(), straight_through=False)
    assert torch.equal(moved[:, :128], plain[:, :128]) and not torch.equal(moved[:, 128:], plain[:, 128:])


def test_compiled_round_trip_agrees_with_eager():
    """enable_torch_compile's form (compiled on CUDA by the modifier; compiled here on the CPU
    to check it): the same values, the same gradients up to summation order. In float64, where
    a group's scale gradient summed in another order differs in its last bits only (in float32
    the two orders were 1.5e-5 apart on a CPU)."""
    from llmc_autoround.rounding import int_round_trip_eager

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA: the modifier's own path
    g = torch.Generator().manual_seed(0)
    grouped = torch.randn(16, 4, 32, generator=g, dtype=torch.float64).to(device)
    step = (torch.rand(16, 4, 1, generator=g, dtype=torch.float64) + 0.05).to(device)
    zero = torch.zeros(16, 4, 1, device=device, dtype=torch.float64)
    bounds = torch.tensor(-8.0, device=device, dtype=torch.float64), torch.tensor(7.0, device=device, dtype=torch.float64)
    results = []
    for fn in (torch.compile(int_round_trip_eager, dynamic=True), int_round_trip_eager):
        value = torch.full_like(grouped, 0.2).requires_grad_(True)
        scale = step.clone().requires_grad_(True)
        out = fn(grouped, value, scale, zero, *bounds, True)
        (out * grouped).sum().backward()
        results.append((out.detach(), value.grad, scale.grad))
    (a, va, sa), (b, vb, sb) = results
    assert torch.equal(a, b)
    torch.testing.assert_close(va, vb)
    torch.testing.assert_close(sa, sb)
