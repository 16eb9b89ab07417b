"""Mutation testing of llmc's numerical code: break one thing, run its tests, expect a failure.

Each mutant replaces one exact snippet of a source file (it must occur once) and runs the
test files that should notice. A mutant the tests do not kill is a bug a future change could
bring in unnoticed: write the test that kills it (against an independent computation), then
keep the mutant here. The source is restored after each mutant, also on Ctrl-C.

    python tools/mutants.py                 # every mutant; prints a table, writes JSON
    python tools/mutants.py --only gptq     # mutants whose name contains "gptq"
    python tools/mutants.py --list

The installs are editable (requirements-dev.txt), so the tests see the mutated source.
The score and the date it was taken are in docs/mutation-testing.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("llmc.mutants")

CORE = "packages/core/src/llmc"
GPTQ, AWQ, SQ = "packages/modifier-gptq", "packages/modifier-awq", "packages/modifier-smoothquant"
AR = "packages/modifier-autoround"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, or files with -k expressions


MUTANTS = [
    # --- GPTQ ---------------------------------------------------------------------------
    Mutant("gptq: a Hessian shared by q/k/v is consumed by its first user", f"{GPTQ}/src/llmc_gptq/batching.py",
           "stacked = torch.stack([m.hessian.to(device) for m in self.matrices])",
           "stacked = self.matrices[0].hessian.to(device)[None] if len(self.matrices) == 1 else torch.stack([m.hessian.to(device) for m in self.matrices])",
           (f"{GPTQ}/tests",)),
    Mutant("gptq: error not propagated to later columns", f"{GPTQ}/src/llmc_gptq/solver.py",
           "W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, None, i, i:]", "pass", (f"{GPTQ}/tests",)),
    Mutant("gptq: no dampening", f"{GPTQ}/src/llmc_gptq/solver.py",
           "frac = torch.full_like(unit, dampening_frac)", "frac = torch.zeros_like(unit)", (f"{GPTQ}/tests",)),
    Mutant("gptq: Gram product of |X| on one side", f"{GPTQ}/src/llmc_gptq/hessian.py",
           "    x = x.float()\n    return x.t() @ x", "    x = x.float()\n    return x.t() @ x.abs()", (f"{GPTQ}/tests",)),
    Mutant("gptq: group scales indexed by block, not by column", f"{GPTQ}/src/llmc_gptq/solver.py",
           "index = (columns // args.group_size)[:, None, :].expand(batch, rows, n)",
           "index = (columns * 0)[:, None, :].expand(batch, rows, n)", (f"{GPTQ}/tests",)),
    # --- AWQ ----------------------------------------------------------------------------
    Mutant("awq: duo_scaling inverted", f"{AWQ}/src/llmc_awq/search.py",
           "if duo else x_mean.pow(ratio)", "if not duo else x_mean.pow(ratio)", (f"{AWQ}/tests/test_awq.py",)),
    Mutant("awq: weight mean not normalised by the group max", f"{AWQ}/src/llmc_awq/search.py",
           "    grouped = grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)\n", "",
           (f"{AWQ}/tests/test_awq.py",)),
    Mutant("awq: candidates normalised by the max only", f"{AWQ}/src/llmc_awq/search.py",
           "s = s / (s.max() * s.min()).sqrt()", "s = s / s.max()", (f"{AWQ}/tests/test_awq.py",)),
    Mutant("awq: the loss mask ignored", f"{AWQ}/src/llmc_awq/modifier.py",
           "    return rows[mask.reshape(-1).to(x.device) == 1]", "    return rows", (f"{AWQ}/tests/test_awq.py",)),
    # --- SmoothQuant ----------------------------------------------------------------------
    Mutant("smoothquant: alpha and 1 - alpha swapped", f"{SQ}/src/llmc_smoothquant/modifier.py",
           "act.pow(alpha) / weight_max.pow(1.0 - alpha)", "act.pow(1.0 - alpha) / weight_max.pow(alpha)",
           (f"{SQ}/tests",)),
    Mutant("smoothquant: batch counter never reset", f"{SQ}/src/llmc_smoothquant/modifier.py",
           "self._batches = 0  # the sequential", "pass  # the sequential", (f"{SQ}/tests",)),
    Mutant("smoothquant: max over every weight of the layer, not per input channel", f"{SQ}/src/llmc_smoothquant/modifier.py",
           "[w.detach().abs().amax(dim=0).float() for w in balance_weights]",
           "[w.detach().abs().amax().expand(w.shape[1]).float() for w in balance_weights]", (f"{SQ}/tests",)),
    Mutant("mappings: an offset (1 + weight) norm folded as a plain one", f"{CORE}/mappings.py",
           "new = (1.0 + weight.float()) / s.to(weight.device) - 1.0", "new = weight.float() / s.to(weight.device)",
           (f"{SQ}/tests", f"{AWQ}/tests/test_awq.py")),
    # --- observers and scales ---------------------------------------------------------------
    Mutant("fused NVFP4 global scale: max over the group instead of min", f"{CORE}/quantization/calibrate.py",
           "shared = torch.stack([scales[m] for m in members]).min(dim=0).values",
           "shared = torch.stack([scales[m] for m in members]).max(dim=0).values", ("tests/test_observers.py",)),
    Mutant("static_minmax keeps the last range", f"{CORE}/quantization/observers.py",
           "lo, hi = torch.minimum(self.min, lo), torch.maximum(self.max, hi)", "pass",
           ("tests/test_observers.py",)),
    Mutant("minmax moving average weights the new value by 1 - c", f"{CORE}/quantization/observers.py",
           "lo, hi = self.min * (1.0 - c) + lo * c, self.max * (1.0 - c) + hi * c",
           "lo, hi = self.min * c + lo * (1.0 - c), self.max * c + hi * (1.0 - c)", ("tests/test_observers.py",)),
    Mutant("mse observer ignores norm", f"{CORE}/quantization/observers.py",
           "error = (q - x).abs().pow(norm).sum(dim=(0, -1))", "error = (q - x).abs().sum(dim=(0, -1))",
           ("tests/test_observers.py",)),
    Mutant("mse observer never stops early (patience ignored)", f"{CORE}/quantization/observers.py",
           "                if stale >= patience:\n                    break", "                pass",
           ("tests/test_observers.py",)),
    # --- model_free, recipe, evaluation, resume ---------------------------------------------
    Mutant("model_free resume skips the size/header check of finished shards", f"{CORE}/model_free/run.py",
           'if path.stat().st_size != record["file_bytes"] or set(read_header(path)) != set(record["tensors"]):',
           "if False:", ("tests/test_model_free.py",)),
    Mutant("recipe: top-level groups run after the named stages", f"{CORE}/recipe.py",
           "stages.insert(0, Stage(DEFAULT_STAGE, tuple(loose)))", "stages.append(Stage(DEFAULT_STAGE, tuple(loose)))",
           ("tests/test_recipe.py",)),
    Mutant("evaluation: KL(model || reference) instead of KL(reference || model)", f"{CORE}/evaluation.py",
           "kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()", "kl += (logp.exp() * (logp - ref_logp)).sum().item()",
           ("tests/test_evaluation.py",)),
    Mutant("evaluation: logits scored against the same position's token", f"{CORE}/evaluation.py",
           "target = ids[:, 1:]", "target = ids[:, :-1]", ("tests/test_evaluation.py",)),
    Mutant("resume: a restored layer's state not loaded", f"{CORE}/resume.py",
           "        layer.load_state_dict(tensors, strict=True)\n", "", ("tests/test_resume.py",)),
    # --- AutoRound ----------------------------------------------------------------------
    Mutant("autoround: the learning rate does not decay", f"{AR}/src/llmc_autoround/tuning.py",
           "step = lr * (1.0 - iteration / iters)", "step = lr", (f"{AR}/tests/test_tuning.py",)),
    Mutant("autoround: gradient ascent", f"{AR}/src/llmc_autoround/tuning.py",
           "p.sub_(p.grad.sign(), alpha=step)", "p.add_(p.grad.sign(), alpha=step)", (f"{AR}/tests/test_tuning.py",)),
    Mutant("autoround: the last iteration kept, not the best", f"{AR}/src/llmc_autoround/tuning.py",
           "better = value < best_loss", "better = torch.ones((), dtype=torch.bool, device=value.device)",
           (f"{AR}/tests/test_tuning.py",)),
    Mutant("autoround: range factors not kept in [0, 1]", f"{AR}/src/llmc_autoround/tuning.py",
           "p.clamp_(0.0, 1.0)", "pass", (f"{AR}/tests/test_tuning.py",)),
    Mutant("autoround: no straight-through gradient", f"{AR}/src/llmc_autoround/rounding.py",
           "        rounded = scaled + (rounded - scaled.detach())\n    return (rounded - zero) * step",
           "        rounded = rounded\n    return (rounded - zero) * step", (f"{AR}/tests/test_rounding.py",)),
    Mutant("autoround: the offsets V not added", f"{AR}/src/llmc_autoround/rounding.py",
           "torch.clamp(grouped / step + value + zero, q_min, q_max)", "torch.clamp(grouped / step + zero + value * 0, q_min, q_max)",
           (f"{AR}/tests/test_rounding.py",)),
    Mutant("autoround: the minimum's factor ignored", f"{AR}/src/llmc_autoround/rounding.py",
           "self.low * params.min_scale, self.high", "self.low, self.high", (f"{AR}/tests/test_rounding.py",)),
    Mutant("autoround: targets from the quantized inputs", f"{AR}/src/llmc_autoround/modifier.py",
           "targets = samples.outputs(run, self.batch_size, unquantized_inputs)", "targets = samples.outputs(run, self.batch_size)",
           (f"{AR}/tests/test_autoround_oneshot.py",)),
    Mutant("autoround: the captured rows not the rows drawn", f"{AR}/src/llmc_autoround/samples.py",
           "leaves = [t.index_select(0, rows) if row else t for t, row in zip(leaves, self.per_row, strict=True)]",
           "leaves = [t[: len(rows)] if row else t for t, row in zip(leaves, self.per_row, strict=True)]",
           (f"{AR}/tests/test_tuning.py",)),
]


def run_mutant(mutant: Mutant, python: str) -> tuple[str, float]:
    """Apply ``mutant``, run its tests, restore the file: ("killed" | "survived", seconds)."""
    path = ROOT / mutant.path
    source = path.read_text()
    if source.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the snippet occurs {source.count(mutant.old)} times in {mutant.path}; update the mutant.")
    started = time.perf_counter()
    try:
        path.write_text(source.replace(mutant.old, mutant.new))
        result = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(source)
    return ("killed" if result.returncode != 0 else "survived"), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "mutants-result.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path})")
        return 0
    from tqdm import tqdm

    files = sorted({t for m in chosen for t in m.tests})
    logger.info("Checking that the tests pass unmutated: %s", " ".join(files))
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT)
    if baseline.returncode != 0:
        logger.error("The tests fail without any mutant: fix them first.")
        return 2
    rows = []
    for mutant in tqdm(chosen, desc="mutants", unit="mutant"):
        outcome, seconds = run_mutant(mutant, sys.executable)
        rows.append({"mutant": mutant.name, "file": mutant.path, "outcome": outcome, "seconds": round(seconds, 1)})
        tqdm.write(f"{outcome:8}  {seconds:6.1f} s  {mutant.name}")
    killed = sum(r["outcome"] == "killed" for r in rows)
    width = max(len(r["mutant"]) for r in rows)
    print(f"\n{'mutant'.ljust(width)} | outcome  | s")
    for r in rows:
        print(f"{r['mutant'].ljust(width)} | {r['outcome']:8} | {r['seconds']}")
    print(f"score: {killed}/{len(rows)} killed")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    args.json.write_text(json.dumps({"git": commit, "date": time.strftime("%Y-%m-%d"), "killed": killed,
                                     "total": len(rows), "mutants": rows}, indent=1) + "\n")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
