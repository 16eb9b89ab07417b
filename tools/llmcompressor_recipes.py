"""llm-compressor's end-to-end test recipes (``tests/e2e/recipes/**/*.yaml``), each run through
llmc's ``oneshot`` on a tiny local Llama with local calibration rows, as written.

    git -C <llm-compressor clone> archive HEAD tests/e2e/recipes | tar -x -C /tmp/lc-e2e
    python tools/llmcompressor_recipes.py --repo /tmp/lc-e2e
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="a folder holding tests/e2e/recipes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from llmc import oneshot, tiny

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny.save_tiny(Path(tmp) / "llama", arch="llama", seed=0)
        for recipe in sorted((args.repo / "tests/e2e/recipes").rglob("*.yaml")):
            name = str(recipe.relative_to(args.repo))
            try:
                oneshot(model=str(model), recipe=str(recipe), dataset="llmc-docs", num_calibration_samples=8,
                        max_seq_length=64, output_dir=str(Path(tmp) / recipe.stem))
                results[name] = {"ok": True}
            except Exception as exc:  # noqa: BLE001 - every recipe's outcome is the result
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print("ok  " if results[name]["ok"] else "FAIL", name, results[name].get("error", ""))
    print(f"\n{sum(r['ok'] for r in results.values())} of {len(results)} recipes ran through llmc")
    path = ROOT / "tools" / "llmcompressor_recipes-result.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
