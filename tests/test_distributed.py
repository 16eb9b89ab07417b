"""Data-parallel oneshot over torch.distributed (gloo on CPU): two ranks against one process.

Two ranks run as torchrun would start them (tests/distributed_worker.py, the rank in the
environment); rank 0 saves. Each recipe's checkpoint must equal the single-process run on the
whole calibration set up to reduction order, and the same tolerance must tell it apart from
a run on rank 0's share alone (what a missing all-reduce would give).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc.testing import load_checkpoint_tensors

WORKER = Path(__file__).with_name("distributed_worker.py")
CASES = ["static", "gptq", "awq", "smoothquant"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model: Path, data: Path, out: Path, cases: list[str], *extra: str, timeout: float = 600) -> list[dict]:
    """Two ranks of the worker, as torchrun would start them; each one's report."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
               "TQDM_DISABLE": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(model), str(data), str(out), ",".join(cases), *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    reports = []
    for rank, log in enumerate(logs):
        path = out / f"rank-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report:\n{log[-3000:]}"
        reports.append(json.loads(path.read_text()))
    return reports


def _rows(count: int = 8, length: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 2048, (count, length), generator=g).tolist()


def _distance(a: Path, b: Path) -> tuple[float, float]:
    """How far checkpoint ``a`` is from ``b``: the largest relative difference of a float
    tensor (max |a - b| / max |b|) and the largest share of differing elements of an integer
    (packed) tensor."""
    ta, tb = load_checkpoint_tensors(a), load_checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    floats = ints = 0.0
    for key in ta:
        x, y = ta[key], tb[key]
        assert x.shape == y.shape and x.dtype == y.dtype, key
        if x.is_floating_point():
            x, y = x.float(), y.float()
            floats = max(floats, ((x - y).abs().max() / y.abs().max().clamp(min=1e-12)).item())
        else:
            ints = max(ints, (x != y).float().mean().item())
    return floats, ints


@pytest.fixture(scope="module")
def runs(llama_path, tmp_path_factory) -> dict[str, Path]:
    """The two-rank run of every case, beside single-process runs on the whole set and on
    rank 0's share (batches 0, 2, 4, ...)."""
    from tests.distributed_worker import run

    root = tmp_path_factory.mktemp("distributed")
    rows = _rows()
    data = root / "rows.json"
    data.write_text(json.dumps(rows))
    reports = _launch(llama_path, data, root / "two-ranks", CASES)
    for report in reports:
        assert report.get("error") is None and report["done"] == CASES, report
    for case in CASES:
        run(str(llama_path), rows, root / "whole", case)
        run(str(llama_path), rows[::2], root / "share", case)
    return {"two": root / "two-ranks", "whole": root / "whole", "share": root / "share"}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_the_whole_set(runs, case):
    floats, ints = _distance(runs["two"] / case, runs["whole"] / case)
    # GPTQ, AWQ and SmoothQuant come out identical here; static scales move by up to about 1 %:
    # the calibration forward quantizes activations with each rank's running estimate
    assert floats <= 0.02 and ints <= 0.01, (case, floats, ints)
    alone = _distance(runs["share"] / case, runs["whole"] / case)
    assert max(alone) > 0.05, (case, alone)  # the tolerance would catch a missing all-reduce


def test_only_rank_zero_saves(runs):
    for case in CASES:
        assert (runs["two"] / case / "config.json").exists()
    assert sorted(p.name for p in runs["two"].iterdir()) == sorted([*CASES, "rank-0.json", "rank-1.json"])


def test_a_failing_rank_stops_the_other_and_nothing_is_saved(llama_path, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(_rows()))
    out = tmp_path / "out"
    out.mkdir()
    reports = _launch(llama_path, data, out, ["gptq"], "--fail-on-rank", "1", timeout=300)
    assert "injected failure" in reports[1]["error"]
    assert reports[0]["error"].startswith("DistributedError: Rank 1 failed: RuntimeError: injected failure"), reports[0]
    assert sorted(p.name for p in out.iterdir()) == ["rank-0.json", "rank-1.json"]  # no checkpoint, no leftovers


def test_a_modifier_that_is_not_data_parallel_is_refused_before_loading(llama_path, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(_rows()))
    out = tmp_path / "out"
    out.mkdir()
    reports = _launch(llama_path, data, out, ["autoround"], timeout=300)
    for report in reports:
        assert "AutoRoundModifier does not calibrate data-parallel" in report["error"], report


def test_fewer_batches_than_ranks_is_refused(llama_path, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(_rows(count=1)))
    out = tmp_path / "out"
    out.mkdir()
    reports = _launch(llama_path, data, out, ["gptq"], timeout=300)
    for report in reports:
        assert "1 calibration batches for 2 ranks" in report["error"], report


def test_torchrun_runs_the_command_line(llama_path, tmp_path):
    """``torchrun --nproc-per-node 2 -m llmc oneshot ...`` gives the checkpoint ``llmc oneshot``
    gives in one process."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      targets: [Linear]\n"
                      "      scheme: W4A16\n      ignore: [lm_head]\n")
    common = ["-m", "llmc", "oneshot", "--model", str(llama_path), "--dataset", "llmc-docs", "--recipe", str(recipe),
              "--num_calibration_samples", "8", "--max_seq_length", "64"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    logs = []
    for launcher, out in ((torchrun, tmp_path / "two"), ([sys.executable], tmp_path / "one")):
        done = subprocess.run([*launcher, *common, "--output_dir", str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        logs.append(done.stdout + done.stderr)
    assert "rank 1 of 2 takes batches 1, 3, ..." in logs[0] and "rank 1 of 2" not in logs[1]
    floats, ints = _distance(tmp_path / "two", tmp_path / "one")
    assert floats <= 0.02 and ints <= 0.01, (floats, ints)
