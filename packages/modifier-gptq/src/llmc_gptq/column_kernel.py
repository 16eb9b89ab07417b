"""The GPTQ column loop of one block as a single Triton kernel (integer schemes on CUDA).

Within a block, each row of the weight is independent: a program keeps a tile of
rows in registers and walks the block's columns in order, quantizing a column,
storing it and its scaled error, and updating the tile's later columns. The eager
loop (:func:`llmc_gptq.solver._column_loop`) launches a dozen tiny kernels per column,
about 1,500 per block, each too small to fill the GPU; here it is one launch.

The arithmetic is the eager loop's: IEEE division, round half to even, clamp to the
integer range, ``(q - z) * s``. Triton ships with CUDA builds of torch; without it
(or off CUDA) the solver keeps the eager loop.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

ROWS_PER_PROGRAM = 32


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        f = tl.floor(x + 0.5)
        tie = (f - x) == 0.5
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(tie & odd, f - 1.0, f)

    @triton.jit
    def _column_loop_kernel(
        W, S, Z, Hinv, Q, E, rows, lo, hi, cols: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        batch = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        in_rows = r < rows
        in_cols = c < cols
        base = batch * rows * cols
        row_offsets = base + r.to(tl.int64) * cols
        w = tl.load(W + row_offsets[:, None] + c[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0)
        h_base = batch * cols * cols
        for i in range(cols):  # a block's width: one compilation per width seen
            column = tl.sum(tl.where(c[None, :] == i, w, 0.0), axis=1)
            s = tl.load(S + row_offsets + i, mask=in_rows, other=1.0)
            z = tl.load(Z + row_offsets + i, mask=in_rows, other=0.0)
            level = tl.clamp(_round_half_even(tl.math.div_rn(column, s)) + z, lo, hi)
            q = (level - z) * s
            err = tl.math.div_rn(column - q, tl.load(Hinv + h_base + i * cols + i))
            h = tl.load(Hinv + h_base + i * cols + c, mask=in_cols & (c > i), other=0.0)
            w = w - err[:, None] * h[None, :]
            tl.store(Q + row_offsets + i, q, mask=in_rows)
            tl.store(E + row_offsets + i, err, mask=in_rows)


def _block_columns(cols: int) -> int:
    return max(16, 1 << (cols - 1).bit_length())


def warm_up(device: torch.device, width: int = 128) -> None:
    """Compile the kernel for blocks ``width`` columns wide on ``device`` (the first solve
    otherwise waits about half a second for it): a call on 32 rows, a row count of the same
    divisibility as the real ones, since Triton specialises on it. A failure is left for the
    solve to meet and report (it falls back to the eager loop)."""
    rows = ROWS_PER_PROGRAM
    try:
        w = torch.zeros(1, rows, width, device=device)
        hinv = torch.eye(width, device=device)[None]
        column_loop(w, torch.ones_like(w), torch.zeros_like(w), hinv, -8.0, 7.0)
    except Exception:  # noqa: BLE001 - see above
        return


def column_loop(
    W1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, Hinv1: torch.Tensor, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized columns and scaled errors (Q1, Err1) of one block, shaped (batch, rows, cols)
    like ``W1``; ``S1``/``Z1`` per-element scales and zero points, ``Hinv1`` (batch, cols, cols)
    the block of the inverse Hessian's upper Cholesky factor. ``W1`` is not modified."""
    assert triton is not None
    W1, S1, Z1, Hinv1 = (t.float().contiguous() for t in (W1, S1, Z1, Hinv1))
    batch, rows, cols = W1.shape
    Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
    grid = (batch, triton.cdiv(rows, ROWS_PER_PROGRAM))
    _column_loop_kernel[grid](
        W1, S1, Z1, Hinv1, Q1, Err1, rows, lo, hi, cols=cols, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_C=_block_columns(cols)
    )
    return Q1, Err1
