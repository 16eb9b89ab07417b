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
DENSE = ["static", "gptq", "gptq-basic", "awq", "smoothquant"]
MOE = ["gptq-moe-routed"]
CASES = DENSE + MOE
ROUTED_TOKEN = 5  # only rank 0's share holds it; only it reaches expert 7 of the MoE model


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


def _launch_in(tmp_path: Path, model: Path, rows: list[list[int]], cases: list[str], *extra: str) -> tuple[list[dict], Path]:
    """:func:`_launch` on ``rows`` written under ``tmp_path``; the reports and the output folder."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    out.mkdir()
    return _launch(model, data, out, cases, *extra, timeout=300), out


def _rows(count: int = 8, length: int = 48) -> list[list[int]]:
    """Random tokens; the even rows (rank 0's share of two) hold ROUTED_TOKEN a few times."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(ROUTED_TOKEN + 1, 2048, (count, length), generator=g)
    rows[::2, ::8] = ROUTED_TOKEN
    return rows.tolist()


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
def qwen3_moe(tmp_path_factory) -> Path:
    """A one-layer Qwen3-MoE whose router sends a token to expert 7 only if it is ROUTED_TOKEN:
    with routed calibration, expert 7 sees data on rank 0 and none on rank 1 (its Hessians join
    the sum as zeros there). Residual features 0 and 1 carry the embeddings alone (attention
    writes nothing there); the router's row 7 reads them."""
    import transformers

    from llmc import tiny

    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 3:  # transformers leaves some fused experts at zero
                p.normal_(0, 0.05)
        embed = model.model.embed_tokens.weight
        embed[:, 0], embed[:, 1] = 0.0, 1.0
        embed[ROUTED_TOKEN, 0] = 10.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight[:2] = 0.0
        router = layer.mlp.gate.weight
        router[:, :2] = 0.0
        router[7, 0], router[7, 1] = 100.0, -50.0
    path = tmp_path_factory.mktemp("qwen3-moe")
    model.save_pretrained(path)
    tiny.build_tokenizer(2048).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(llama_path, qwen3_moe, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """For every case: the two-rank run, and single-process runs on the whole set and on rank
    0's share (batches 0, 2, 4, ...)."""
    from tests.distributed_worker import run

    root = tmp_path_factory.mktemp("distributed")
    rows = _rows()
    data = root / "rows.json"
    data.write_text(json.dumps(rows))
    paths = {}
    for model, cases, name in ((llama_path, DENSE, "two-ranks"), (qwen3_moe, MOE, "two-ranks-moe")):
        for report in _launch(model, data, root / name, cases):
            assert report.get("error") is None and report["done"] == cases, report
        for case in cases:
            run(str(model), rows, root / "whole", case)
            run(str(model), rows[::2], root / "share", case)
            paths[case] = {"two": root / name / case, "whole": root / "whole" / case, "share": root / "share" / case}
    return paths


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_the_whole_set(runs, case):
    floats, ints = _distance(runs[case]["two"], runs[case]["whole"])
    # GPTQ, AWQ and SmoothQuant come out identical or within a rounding flip; static scales move
    # by a few % (2.3 % here): the calibration forward quantizes activations with each rank's
    # running estimate of their scale, which one process builds in another order
    assert floats <= 0.05 and ints <= 0.01, (case, floats, ints)
    alone = _distance(runs[case]["share"], runs[case]["whole"])
    assert max(alone) > 0.15, (case, alone)  # the tolerance would catch a missing all-reduce (20-98 % here)


def test_ranks_holding_their_own_shares_in_the_callers_group(llama_path, runs, tmp_path):
    """As llm-compressor's DDP scripts: the script makes the group and loads each rank's slice
    (``get_rank_partition``); the ranks' data differ, so each calibrates on what it holds."""
    reports, out = _launch_in(tmp_path, llama_path, _rows(), ["gptq"], "--own-share")
    for report in reports:
        assert report.get("error") is None and report["done"] == ["gptq"], report
    floats, ints = _distance(out / "gptq", runs["gptq"]["whole"])
    assert floats <= 0.05 and ints <= 0.01, (floats, ints)


def test_only_rank_zero_saves(runs):
    for cases in (DENSE, MOE):
        folder = runs[cases[0]]["two"].parent
        assert sorted(p.name for p in folder.iterdir()) == sorted([*cases, "rank-0.json", "rank-1.json"])
        for case in cases:
            assert (folder / case / "config.json").exists()


def test_a_failing_rank_stops_the_other_and_nothing_is_saved(llama_path, tmp_path):
    reports, out = _launch_in(tmp_path, llama_path, _rows(), ["gptq"], "--fail-on-rank", "1")
    assert "injected failure" in reports[1]["error"]
    assert reports[0]["error"].startswith("DistributedError: Rank 1 failed: RuntimeError: injected failure"), reports[0]
    assert sorted(p.name for p in out.iterdir()) == ["rank-0.json", "rank-1.json"]  # no checkpoint, no leftovers


def test_a_modifier_that_is_not_data_parallel_is_refused_before_loading(llama_path, tmp_path):
    reports, out = _launch_in(tmp_path, llama_path, _rows(), ["autoround"])
    for report in reports:
        assert "AutoRoundModifier does not calibrate data-parallel" in report["error"], report


def test_fewer_batches_than_ranks_is_refused(llama_path, tmp_path):
    reports, out = _launch_in(tmp_path, llama_path, _rows(count=1), ["gptq"])
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
    assert floats <= 0.05 and ints <= 0.01, (floats, ints)


def test_get_rank_partition_slices_a_split_into_disjoint_covering_shares(monkeypatch):
    from llmc import distributed
    from llmc.datasets.utils import get_rank_partition, rank_bounds

    assert get_rank_partition("train", 10) == "train[0:10]"  # one process: everything
    for samples, ranks in ((10, 3), (256, 8), (5, 8)):
        shares = [range(*rank_bounds(samples, r, ranks)) for r in range(ranks)]
        assert [i for share in shares for i in share] == list(range(samples))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert get_rank_partition("train_sft", 10) == "train_sft[3:6]"
    with pytest.raises(ValueError, match="sliced already"):
        get_rank_partition("train[:100]", 10)


def test_the_group_llmc_joins_is_left_at_interpreter_exit(monkeypatch, tmp_path):
    """Joined under torchrun, the process group is left by an exit handler (gloo's threads,
    left to the interpreter's teardown, once aborted a rank that had saved); a group the
    caller made is the caller's to leave."""
    import torch.distributed as dist

    from llmc import distributed

    exits = []
    monkeypatch.setattr(distributed.atexit, "register", exits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun says; the group made here holds this process alone
    real = dist.init_process_group
    store = f"file://{tmp_path / 'store'}"
    monkeypatch.setattr(dist, "init_process_group", lambda backend: real(backend, init_method=store, rank=0, world_size=1))
    try:
        distributed.initialize()
        assert dist.is_initialized() and exits == [distributed._leave_group]
        exits[0]()
        assert not dist.is_initialized()
        real("gloo", init_method=f"file://{tmp_path / 'caller'}", rank=0, world_size=1)  # the caller's own
        distributed.initialize()
        assert exits == [distributed._leave_group]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
