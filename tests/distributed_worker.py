"""One rank of a distributed oneshot, as torchrun starts it (the environment names the rank).

    python tests/distributed_worker.py MODEL DATA.json OUT CASE[,CASE...] [--fail-on-rank R] [--own-share]

Runs each case's recipe through ``oneshot`` (rank 0 saves OUT/CASE) and writes what
happened to OUT/rank-N.json: the cases done, or the error that stopped this rank.
``--fail-on-rank R`` makes rank R raise when its first decoder layer ends. ``--own-share``
makes the process group itself first (the Python API inside the caller's group) and hands
each rank only its contiguous share of the rows, as llm-compressor's ``get_rank_partition``
scripts do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def recipe(case: str):
    from llmc.modifiers.awq import AWQModifier
    from llmc.modifiers.gptq import GPTQModifier
    from llmc.modifiers.quantization import QuantizationModifier
    from llmc.modifiers.smoothquant import SmoothQuantModifier

    if case == "static":  # FP8 static per-tensor input scales: the default moving-average observer
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"])
    if case == "gptq":
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    if case == "gptq-basic":  # the whole model per batch, Hessians kept on the CPU
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], offload_hessians=True)
    if case == "awq":
        return AWQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"])
    if case == "smoothquant":
        return [SmoothQuantModifier(smoothing_strength=0.8),
                QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if case == "gptq-moe-routed":  # experts see only the tokens routed to them: some none on a rank
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])
    if case == "autoround":
        from llmc.modifiers.autoround import AutoRoundModifier

        return AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=2)
    raise ValueError(case)


def run(model: str, rows: list[list[int]], out: Path, case: str) -> None:
    import datasets

    from llmc import oneshot

    data = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    extra = {"moe_calibrate_all_experts": False} if case.endswith("-routed") else {}
    if case.endswith("-basic"):
        extra["pipeline"] = "basic"
    oneshot(model=model, dataset=data, recipe=recipe(case), output_dir=str(out / case),
            num_calibration_samples=len(rows), max_seq_length=len(rows[0]), **extra)


class FailAtFirstLayer:
    from llmc.api import hookimpl

    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer) -> None:
        raise RuntimeError("injected failure at the end of " + layer_name)


def main() -> None:
    model, data, out, cases = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(",")
    fail_on = int(sys.argv[sys.argv.index("--fail-on-rank") + 1]) if "--fail-on-rank" in sys.argv else None
    rank = int(os.environ["RANK"])
    rows = json.loads(data.read_text())
    report: dict = {"rank": rank, "done": []}
    if "--own-share" in sys.argv:
        import torch.distributed as dist

        from llmc.datasets.utils import rank_bounds

        dist.init_process_group("gloo")
        rows = rows[slice(*rank_bounds(len(rows), rank, int(os.environ["WORLD_SIZE"])))]
    try:
        if fail_on == rank:
            from llmc.plugins import get_plugin_manager

            get_plugin_manager().register(FailAtFirstLayer(), name="fail-at-first-layer")
        for case in cases:
            run(model, rows, out, case)
            report["done"].append(case)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(exc).__name__}: {exc}"
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
