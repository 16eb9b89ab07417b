"""AutoRound W4A16: seconds per layer and held-out quality, llmc against llm-compressor,
with GPTQ (the bar AutoRound must clear) and round-to-nearest from the same run.

Rows (see ``benchmarks.quality`` for how each runs and is scored): llmc's AutoRound (and
with torch.compile, which acts on GPUs only), llmc's GPTQ, llmc's round-to-nearest, llm-compressor 0.14's AutoRoundModifier (auto-round 0.15)
and its GPTQ; AutoRound with each tool's defaults (200 iterations, batches of 8, lr 1/iters;
torch.compile on in llm-compressor, off in llmc) on both sides.

    python -m benchmarks.autoround --model tiny --samples 64 --seq 256 --peer-python /tmp/lcvenv/bin/python  # CPU
    python -m benchmarks.autoround --model small --peer-path /tmp/peer:/tmp/deps   # GPU machine
"""

from __future__ import annotations

from benchmarks.quality import Row, compare_rows, parser


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__.splitlines()[0], samples=256, seq=512)
    cli.add_argument("--iters", type=int, default=200)
    cli.add_argument("--scheme", default="W4A16")
    cli.add_argument("--no-peer-gptq", action="store_true", help="leave llm-compressor's GPTQ out")
    args = cli.parse_args(argv)
    common = dict(targets=["Linear"], scheme=args.scheme, ignore=["lm_head"])
    autoround = {**common, "iters": args.iters, "batch_size": 8}
    rows = [
        Row("llmc-autoround", "AutoRoundModifier", autoround),
        Row("llmc-autoround-compile", "AutoRoundModifier", {**autoround, "enable_torch_compile": True}),
        Row("llmc-gptq", "GPTQModifier", common),
        Row("llmc-rtn", "QuantizationModifier", common),
        Row("llm-compressor-autoround", "AutoRoundModifier", autoround, peer=True),
    ]
    if not args.no_peer_gptq:
        rows.append(Row("llm-compressor-gptq", "GPTQModifier", common, peer=True))
    compare_rows("autoround", rows, args, speedup=("llmc-autoround", "llm-compressor-autoround"))


if __name__ == "__main__":
    main()
