"""A crashed sequential oneshot resumes: kill -9 mid-calibration, the same command again, and the
checkpoint is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from llmc import oneshot, tiny
from llmc.resume import resume_path
from tests.helpers import kill_when_marked

# the killed run: the same oneshot, stopped for good while the `when`-th layer end of
# model.layers.2 runs (layers 0 and 1 of that pipeline run are finished and saved)
KILLED = """
import sys, time
from pathlib import Path
from llmc import oneshot
from llmc.hookspecs import hookimpl
from llmc.plugins import get_plugin_manager
source, out, marker, recipe, when = sys.argv[1:6]
class Stop:
    seen = 0
    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer):
        if layer_name == "model.layers.2":
            Stop.seen += 1
            if Stop.seen == int(when):
                Path(marker).write_text("calibrating")
                time.sleep(120)
get_plugin_manager().register(Stop(), name="stop")
oneshot(model=source, recipe=recipe, output_dir=out, dataset="llmc-docs", num_calibration_samples=8,
        max_seq_length=48, resume_interval=0, moe_calibrate_all_experts=False)
"""

SMOOTH_THEN_GPTQ_FP8 = """
stage:
  modifiers_modifiers:
    SmoothQuantModifier: {smoothing_strength: 0.8}
    GPTQModifier: {targets: [Linear], scheme: FP8, ignore: [lm_head]}
"""
FP8_STATIC_EXPERTS = """
stage:
  modifiers_modifiers:
    QuantizationModifier: {targets: [Linear], scheme: FP8, ignore: [lm_head, "re:.*mlp.gate$"]}
"""
IMATRIX = """
stage:
  modifiers_modifiers:
    QuantizationModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head], weight_observer: imatrix_mse}
"""
AWQ = """
stage:
  modifiers_modifiers:
    AWQModifier: {targets: [Linear], scheme: W4A16_ASYM, ignore: [lm_head]}
"""


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return tiny.save_tiny(
        tmp_path_factory.mktemp("four"), arch="llama", hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, seed=0,
    )


@pytest.fixture(scope="module")
def four_moe_layers(tmp_path_factory):
    """Qwen3-MoE with more experts than a few tokens reach: unseen experts take their
    siblings' observed ranges, which a resumed run must still know for restored layers."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=1, moe_intermediate_size=32,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("four-moe")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny.build_tokenizer(2048).save_pretrained(path)
    return path


def _run(source, out, recipe, **kwargs):
    return oneshot(model=str(source), recipe=recipe, output_dir=str(out), dataset="llmc-docs",
                   num_calibration_samples=8, max_seq_length=48, resume_interval=0,
                   moe_calibrate_all_experts=False, **kwargs)


def _kill_at(source, out, recipe, when, tmp_path):
    kill_when_marked(KILLED, source, out, recipe, when, marker=tmp_path / "marker")


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("model", "recipe", "when", "restored"),
    [
        ("four_layers", SMOOTH_THEN_GPTQ_FP8, 2, ["4 of 4", "2 of 4"]),
        ("four_layers", AWQ, 1, ["2 of 4"]),
        ("four_moe_layers", FP8_STATIC_EXPERTS, 1, ["2 of 4"]),
        ("four_layers", IMATRIX, 1, ["2 of 4"]),
    ],
    ids=["smoothquant-then-gptq-fp8-static", "awq", "moe-fp8-static-unseen-experts", "imatrix-ranges-set-at-layer-ends"],
)
def test_a_killed_sequential_run_resumes_to_a_byte_identical_checkpoint(
    request, tmp_path, caplog, model, recipe, when, restored
):
    four_layers = request.getfixturevalue(model)
    reference = tmp_path / "reference"
    _run(four_layers, reference, recipe)
    out = tmp_path / "out"
    _kill_at(four_layers, out, recipe, when, tmp_path)
    assert not out.exists() and resume_path(out).exists()

    with caplog.at_level(logging.INFO, logger="llmc_pipelines"):
        _run(four_layers, out, recipe)
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming")]
    assert [m.split(" layers")[0].removeprefix("Resuming: ") for m in resumed] == restored
    assert _files(out) == _files(reference)
    assert not resume_path(out).exists()  # the saved checkpoint leaves nothing to resume


def test_progress_of_another_command_is_discarded(four_layers, tmp_path, caplog):
    out = tmp_path / "out"
    _kill_at(four_layers, out, AWQ, 1, tmp_path)
    other = AWQ.replace("W4A16_ASYM", "W8A16")
    reference = tmp_path / "reference"
    _run(four_layers, reference, other)
    with caplog.at_level(logging.INFO):
        _run(four_layers, out, other)
    assert any("kept for a different command" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith("Resuming") for r in caplog.records)
    assert _files(out) == _files(reference)


def test_resume_false_starts_over_and_keeps_no_progress(four_layers, tmp_path, caplog):
    out = tmp_path / "out"
    _kill_at(four_layers, out, AWQ, 1, tmp_path)
    with caplog.at_level(logging.INFO):
        _run(four_layers, out, AWQ, resume=False)
    assert not any(r.getMessage().startswith("Resuming") for r in caplog.records)
    assert not resume_path(out).exists() and (out / "config.json").exists()


def test_a_modifier_that_cannot_resume_keeps_no_progress(four_layers, tmp_path, caplog, monkeypatch):
    from llmc.modifiers.base import Modifier
    from llmc.resume import SequentialProgress

    class Counting(Modifier):
        """Sequential, with no restore: it must see every layer."""

        def pipeline(self) -> str:
            return "sequential"

    assert not Counting().resumable()
    saved = []
    monkeypatch.setattr(SequentialProgress, "save", lambda self, *a, **k: saved.append(a))
    with caplog.at_level(logging.INFO):
        _run(four_layers, tmp_path / "out", [Counting()])
    assert saved == []
    assert any("Counting cannot resume" in r.getMessage() for r in caplog.records)


def test_progress_is_saved_only_when_worth_its_time(tmp_path, monkeypatch):
    """Every resume_interval seconds at most, and only when the save takes under a tenth of the
    time since the last one (bytes to write over the write rate, assumed or last measured)."""
    import llmc.resume
    from llmc.resume import ResumeStore

    clock = [0.0]
    monkeypatch.setattr(llmc.resume.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(llmc.resume, "_ASSUMED_WRITE_RATE", 1e6)  # 1 MB/s
    progress = ResumeStore(tmp_path / "resume", "print", interval=60).sequential_run(["a", "b"])
    layers = [torch.nn.Linear(1000, 1000, bias=False)] * 2  # 4 MB each: 40 s at ten times 1 MB/s
    hidden = [torch.zeros(25_000_000 // 4)]  # 25 MB: 250 s
    clock[0] = 59.0
    assert not progress.due(1, layers, None)
    clock[0] = 60.0
    assert progress.due(1, layers, None)
    assert not progress.due(1, layers, hidden)  # 290 s of saving is not worth 60 s of work
    clock[0] = 290.0
    assert progress.due(1, layers, hidden)
    assert ResumeStore(tmp_path / "never", "print", interval=0).sequential_run(["a"]).due(1, layers, hidden)
