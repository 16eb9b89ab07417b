"""What one Llama-3-8B-shaped layer's GPTQ costs, piece by piece, against the GEMM floor.

Times on one 2048-token batch (CUDA events, after a warm-up): the decoder layer's forward
(also the host's time to launch it, and the same call replayed from a CUDA graph), the same
forward stopped before the down projection (all a calibration pass needs), each way of
accumulating the four distinct Hessians, and each of the layer's four GPTQ solves
(q/k/v stacked, o, gate/up stacked, down) split into its phases. Multiplied out to
``--samples`` batches this is the per-layer budget of ``benchmarks.gptq_layer``.

    python -m benchmarks.layer_costs            # GPU machine
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from benchmarks.common import cuda_ms as timed
from benchmarks.common import table, write_json


def wall(fn: Callable[[], object]) -> float:
    """Milliseconds of one call, host and device (synchronised)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3


def launch_ms(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds of host time per call of ``fn`` until its kernels are queued (not run):
    a pass whose host work per batch exceeds its device time waits on its launching thread."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    launched = time.perf_counter() - started
    torch.cuda.synchronize()
    return launched * 1e3 / repeats


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph (after warm-up calls on a side stream): the same
    kernels with no host work between them, the device's own time for the call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class _Stop(Exception):
    pass


def layer_rows(args: argparse.Namespace) -> list[dict]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from llmc.linalg import _add_product, add_gram

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=32,
                         num_key_value_heads=8, attn_implementation="sdpa")
    with torch.device("cuda"):
        layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16).eval()
        rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, args.seq, args.hidden, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(args.seq, device="cuda")[None]
    embeddings = rotary(x, positions)
    mlp = layer.mlp
    rows = []

    def forward() -> None:
        layer(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)

    def stop(module, inputs):
        raise _Stop

    def forward_until_down() -> None:
        try:
            forward()
        except _Stop:
            pass

    with torch.no_grad():
        rows.append({"what": "layer forward", "ms_per_batch": timed(forward, args.repeats)})
        rows.append({"what": "layer forward, the host's time to launch it", "ms_per_batch": launch_ms(forward, args.repeats)})
        rows.append({"what": "layer forward replayed from a CUDA graph", "ms_per_batch": timed(graphed(forward), args.repeats)})
        handle = mlp.down_proj.register_forward_pre_hook(stop)
        rows.append({"what": "forward until down_proj's input", "ms_per_batch": timed(forward_until_down, args.repeats)})
        handle.remove()
        inputs = {}
        for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            module = layer.get_submodule(("self_attn." if name in ("q_proj", "o_proj") else "mlp.") + name)
            module.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
        forward()
        hessians = {n: torch.zeros(t.shape[-1], t.shape[-1], device="cuda") for n, t in inputs.items()}

        def full_grams() -> None:
            for name, t in inputs.items():
                x2 = t.reshape(-1, t.shape[-1])
                _add_product(hessians[name], x2.t(), x2)

        def all_grams() -> None:
            for name, t in inputs.items():
                add_gram(hessians[name], t)

        rows.append({"what": "4 Hessians, full product per batch", "ms_per_batch": timed(full_grams, args.repeats)})
        rows.append({"what": "4 Hessians, upper bands per batch", "ms_per_batch": timed(all_grams, args.repeats)})
        grouped = {n: torch.cat([t] * args.group, dim=1) for n, t in inputs.items()}

        def grouped_grams() -> None:
            for name, t in grouped.items():
                add_gram(hessians[name], t)

        ms = timed(grouped_grams, args.repeats) / args.group
        rows.append({"what": f"4 Hessians, upper bands, {args.group} batches per product", "ms_per_batch": ms})
    return rows


def _hessian(features: int, tokens: int) -> torch.Tensor:
    h = torch.zeros(features, features, device="cuda")
    for _ in range(0, tokens, 4096):
        x = torch.randn(4096, features, device="cuda", dtype=torch.bfloat16)
        torch.addmm(h, x.t(), x, out_dtype=torch.float32, out=h)
    return h


def solve_rows(args: argparse.Namespace) -> list[dict]:
    from compressed_tensors.quantization import preset_name_to_scheme

    weights = preset_name_to_scheme("W4A16", ["Linear"]).weights
    shapes = {
        "q/k/v stacked": (6144, args.hidden),
        "o": (args.hidden, args.hidden),
        "gate/up stacked": (2 * args.intermediate, args.hidden),
        "down": (args.hidden, args.intermediate),
    }
    hessians = {f: _hessian(f, 2 * f) for f in {args.hidden, args.intermediate}}
    rows = []
    for name, (out, features) in shapes.items():
        w = (torch.randn(out, features, device="cuda") * 0.02).to(torch.bfloat16)
        rows.append({"what": f"solve {name} {out}x{features}", **_solve_phases(w, hessians[features], weights)})
    return rows


def _solve_phases(w: torch.Tensor, H: torch.Tensor, weights) -> dict:
    from llmc_gptq import solver

    def whole() -> None:
        solver.gptq_quantize_batch(w[None], [H.clone()[None]], weights, actorder=True, scale_dtype=torch.bfloat16)

    whole()  # Triton compiles on first use
    clone_ms = wall(lambda: H.clone())
    total = wall(whole) - clone_ms
    damp = H.clone()[None]
    damp.diagonal(dim1=-2, dim2=-1).add_(0.01 * H.diagonal().mean())
    cholesky = wall(lambda: solver.inverse_cholesky([damp.clone()], 0.01)) - clone_ms
    quadratic = wall(lambda: solver.quadratic_form(w[None].float(), H[None]))
    qparams = wall(lambda: solver.weight_qparams(w.float(), weights))
    return {"ms_total": total, "ms_inverse_cholesky": cholesky, "ms_quadratic_form": quadratic,
            "ms_qparams": qparams, "ms_column_loop_and_rest": total - cholesky - quadratic - qparams}


def pinned_rows(total_gb: float) -> list[dict]:
    """Seconds to allocate pinned host memory for captured activations: one 16 MB buffer per
    2048-token batch (the sequential pipeline's chunks) against larger slabs (each size its own
    class in the host allocator's cache, so none is served from an earlier one)."""
    rows = []
    for size_mb in (16, 256, 1024):
        count = max(1, int(total_gb * 1024 / size_mb))
        started = time.perf_counter()
        kept = [torch.empty(size_mb * 2**20, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        seconds = time.perf_counter() - started
        rows.append({"what": f"pin {count} x {size_mb} MB", "seconds": seconds, "gb_per_s": total_gb / seconds})
        del kept
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--group", type=int, default=4, help="batches per Hessian product")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pinned-gb", type=float, default=4.0, help="pinned host memory allocated per way")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = layer_rows(args)
    for row in rows:
        row["s_per_layer"] = row["ms_per_batch"] * args.samples / 1e3
    print(table(rows, ["what", "ms_per_batch", "s_per_layer"]))
    solves = solve_rows(args)
    print(table(solves, ["what", "ms_total", "ms_inverse_cholesky", "ms_quadratic_form", "ms_qparams", "ms_column_loop_and_rest"]))
    pinned = pinned_rows(args.pinned_gb)
    print(table(pinned, ["what", "seconds", "gb_per_s"]))
    print(f"wrote {write_json('layer_costs', {'args': vars(args), 'layer': rows, 'solves': solves, 'pinned': pinned})}")


if __name__ == "__main__":
    main()
