"""Ways to accumulate a Hessian X^T X on the GPU, timed at Llama-3-8B's shapes.

Each calibration batch adds one (in × in) float32 product per distinct Linear input;
at 512 × 2048 tokens the down projection's (14336²) is most of a layer's Hessian
work. Compared: a float32-output product then an add (two passes over H), the product
added in place (``addmm`` with a float32 output), and products of several batches'
tokens at once. The layer's own forward GEMM is timed beside them for scale.

    python -m benchmarks.hessian_kernels          # GPU machine
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import cuda_ms as timed
from benchmarks.common import table, write_json


def methods(features: int, tokens: int) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call, floating-point operations) for each way, on one batch of ``tokens``."""
    x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16)
    x4 = torch.randn(4 * tokens, features, device="cuda", dtype=torch.bfloat16)
    H = torch.zeros(features, features, device="cuda")
    w = torch.randn(14336 if features == 4096 else 4096, features, device="cuda", dtype=torch.bfloat16)
    flops = 2 * tokens * features * features
    return [
        ("mm (fp32 out) + add", lambda: H.add_(torch.mm(x.t(), x, out_dtype=torch.float32)), flops),
        ("addmm in place (fp32 out)", lambda: torch.addmm(H, x.t(), x, out_dtype=torch.float32, out=H), flops),
        ("addmm, 4 batches of tokens", lambda: torch.addmm(H, x4.t(), x4, out_dtype=torch.float32, out=H), 4 * flops),
        ("mm, bf16 out (no accumulation)", lambda: torch.mm(x.t(), x), flops),
        ("forward GEMM x @ W^T", lambda: torch.mm(x, w.t()), 2 * tokens * features * w.shape[0]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for features in (4096, 14336):
        for name, fn, work in methods(features, args.tokens):
            try:
                ms = timed(fn, args.repeats)
            except RuntimeError as exc:
                rows.append({"features": features, "method": name, "error": str(exc)[:80]})
                continue
            rows.append({"features": features, "method": name, "ms": ms, "tflops": work / ms / 1e9})
    print(table(rows, ["features", "method", "ms", "tflops", "error"]))
    print(f"wrote {write_json('hessian_kernels', {'args': vars(args), 'results': rows})}")


if __name__ == "__main__":
    main()
