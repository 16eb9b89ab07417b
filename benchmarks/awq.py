"""AWQ W4A16_ASYM: seconds per layer and held-out quality, llmc against llm-compressor.

Rows (see ``benchmarks.quality`` for how each runs and is scored): llmc's AWQ (with its
weight clipping), llmc's AWQ without it, round-to-nearest W4A16_ASYM (the bar AWQ must
clear), and llm-compressor's AWQ.

    python -m benchmarks.awq --model tiny --samples 64 --seq 256 --peer-python /tmp/lcvenv/bin/python  # CPU
    python -m benchmarks.awq --model small --peer-path /tmp/peer          # GPU machine
"""

from __future__ import annotations

from benchmarks.quality import Row, compare_rows, parser


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__.splitlines()[0], samples=128, seq=512)
    cli.add_argument("--n-grid", type=int, default=20)
    args = cli.parse_args(argv)
    common = dict(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])
    rows = [
        Row("llmc", "AWQModifier", {**common, "n_grid": args.n_grid}),
        Row("llmc-awq-noclip", "AWQModifier", {**common, "n_grid": args.n_grid, "apply_clip": False}),
        Row("llmc-rtn", "QuantizationModifier", common),
        Row("llm-compressor", "AWQModifier", {**common, "n_grid": args.n_grid}, peer=True),
    ]
    compare_rows("awq", rows, args, speedup=("llmc", "llm-compressor"))


if __name__ == "__main__":
    main()
