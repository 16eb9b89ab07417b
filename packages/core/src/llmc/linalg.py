"""Gram products X^T X of calibration inputs, shared by modifiers that keep them (GPTQ's
Hessians, AWQ's output error of a Linear layer).

Wide ones accumulate their upper triangle only, one band of rows per product (X^T X is
symmetric: a 14336-wide one then costs 57 % of the full product), and are mirrored once
before use (:func:`mirror_upper`).
"""

from __future__ import annotations

import torch


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in float32.

    On CUDA, half-precision activations go straight to the tensor cores with
    float32 accumulation (the inputs are already in that precision, so nothing is
    lost by not upcasting them first); elsewhere they are upcast.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.t(), x, out_dtype=torch.float32)
    x = x.float()
    return x.t() @ x


# rows of H per product of the upper triangle; narrower Hessians take the full product
BAND = 2048


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` in place, ``out`` float32 (maybe a row band of a larger matrix). On
    CUDA, half-precision factors accumulate straight into it on the tensor cores (one GEMM
    reading and writing ``out`` once, instead of a product and a second pass to add it)."""
    if a.is_cuda and out.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out.add_(a.float() @ b.float())


def add_gram(hessian: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``hessian += X^T X`` in place; wider than :data:`BAND`, only the upper triangle (and
    the diagonal blocks whole): call :func:`mirror_upper` before reading it."""
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[-1]
    if n <= BAND:
        _add_product(hessian, x.t(), x)
        return hessian
    for i0 in range(0, n, BAND):
        i1 = min(i0 + BAND, n)
        _add_product(hessian[i0:i1, i0:], x[:, i0:i1].t(), x[:, i0:])
    return hessian


def mirror_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle that :func:`add_gram` accumulates onto the lower one, band by
    band, in place (exactly symmetric afterwards; a no-op on narrower matrices)."""
    n = hessian.shape[-1]
    if n > BAND:
        for i0 in range(0, n - BAND, BAND):
            i1 = i0 + BAND
            hessian[..., i1:, i0:i1].copy_(hessian[..., i0:i1, i1:].transpose(-2, -1))
    return hessian
