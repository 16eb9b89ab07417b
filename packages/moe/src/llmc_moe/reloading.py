"""What reloads a checkpoint with quantized experts, said before it is written.

vLLM reads one quantized tensor per expert for every scheme. transformers reloads the
experts into its fused 3-D parameters, which it does correctly for the integer
pack-quantized formats (W4A16 and the like, tested) but not for FP4 experts: the
values come back wrong with transformers 5.24 and compressed-tensors 0.20 (dense
layers of the same checkpoint reload exactly; the expert tensors themselves are
right, as compressed-tensors' decompressor shows). Families whose checkpoints keep
experts fused (gpt-oss, Llama 4) do not reload through transformers at all; the
warning for those comes at linearization.
"""

from __future__ import annotations

import logging

import torch
from compressed_tensors.quantization import QuantizationType

from llmc_moe.linearize import linear_experts

logger = logging.getLogger(__name__)


def _fp4_experts(model: torch.nn.Module) -> list[str]:
    found = []
    for name, experts in linear_experts(model):
        for linear in experts._linears():
            scheme = getattr(linear, "quantization_scheme", None)
            args = getattr(scheme, "weights", None)
            if args is not None and args.type == QuantizationType.FLOAT and args.num_bits == 4:
                found.append(name)
                break
    return found


def warn_unreloadable(model: torch.nn.Module) -> None:
    fp4 = _fp4_experts(model)
    if fp4:
        logger.warning(
            "%d experts modules (%s, ...) are quantized to FP4 (NVFP4/MXFP4): vLLM loads the "
            "checkpoint, but transformers reloads FP4 experts into its fused experts with wrong "
            "values. To reload it in Python, use llmc.evaluation.load_decompressed(path, "
            "via_transformers=False), which decompresses each expert into the linearized model.",
            len(fp4),
            fp4[0],
        )
