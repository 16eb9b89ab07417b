"""Quantize and compress a dict of weight tensors, with oneshot's own arithmetic.

Each weight becomes a bare ``nn.Linear`` that compressed-tensors initializes for
its scheme; scales come from the same round-to-nearest observers and fused
global scales that ``oneshot`` uses, and compressed-tensors packs the result.
That is why the two entrypoints write bit-identical tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from compressed_tensors.compressors import compress_module
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

from llmc.model_free.shards import typed_views
from llmc.quantization.calibrate import calibrate_weight, check_finite, freeze, fused_global_scales
from llmc.quantization.kernels import eager_kernels


def _linear(weight: torch.Tensor, scheme: QuantizationScheme) -> torch.nn.Linear:
    out_features, in_features = weight.shape
    module = torch.nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    initialize_module_for_quantization(module, scheme.model_copy(deep=True))
    return module


def quantize_tensors(
    tensors: dict[str, torch.Tensor],
    selected: Mapping[str, QuantizationScheme],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Replace each selected ``<module>.weight`` by its compressed tensors (on the CPU)."""
    weights = {name: tensors.pop(name).to(device, non_blocking=True) for name in selected}
    check_finite(weights.items())
    modules = {name.removesuffix(".weight"): _linear(weights[name], scheme) for name, scheme in selected.items()}
    gscales = fused_global_scales(modules.items())
    for module_name, module in modules.items():
        calibrate_weight(module, gscales.get(module_name))
    freeze(modules.items())
    compressed: dict[str, torch.Tensor] = {}
    with eager_kernels():  # as oneshot's saver: the same bytes, and no Triton start-up per process
        for module_name, module in modules.items():
            compress_module(module)
            for key, value in module.state_dict().items():
                compressed[f"{module_name}.{key}"] = value
    on_device = {k: v for k, v in compressed.items() if v.device.type != "cpu"}
    tensors.update(compressed)
    if on_device:
        tensors.update(_to_host(on_device))
    return tensors


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring device tensors back with one copy (many small copies each pay a round trip),
    into pinned memory from a CUDA device, where the copy runs at full bus speed."""
    packed = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()])
    if packed.is_cuda:
        host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(packed.device).synchronize()
    else:
        host = packed.cpu()
    return typed_views(host, ((name, t.dtype, tuple(t.shape)) for name, t in tensors.items()))


def warm_up(weights: Iterable[tuple[QuantizationScheme, torch.Size, torch.dtype]], device: torch.device) -> None:
    """Quantize one random weight of each (scheme, shape, dtype) the checkpoint holds, so that
    CUDA start-up and the loading of every kernel the jobs use (CUDA loads them lazily, on
    first launch) happen while the first shards are still being read, not inside a job."""
    for index, (scheme, shape, dtype) in enumerate(weights):
        weight = torch.randn(shape, device=device).to(dtype)
        name = f"warmup.{index}.weight"
        quantize_tensors({name: weight}, {name: scheme}, device)
