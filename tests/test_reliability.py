"""Faults and bad inputs around the output directory: locks, files that appear meanwhile."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from llmc import model_free_ptq, oneshot
from llmc.hookspecs import hookimpl
from llmc.locking import OutputLockedError, lock_path
from llmc.plugins import get_plugin_manager
from llmc.testing import quant_recipe
from tests.helpers import kill_when_marked

HOLD = """
import sys, time
from llmc.locking import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of ``tmp_path / 'out'``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("entry", ["oneshot", "model_free_ptq"])
def test_a_second_run_into_a_locked_directory_refuses_naming_the_first(entry, holder, llama_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
        if entry == "oneshot":
            oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out))
        else:
            model_free_ptq(llama_path, out, "W4A16")
    assert not out.exists()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # the first run's lock stays


def test_a_lock_left_by_a_killed_run_is_taken_over(llama_path, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    import socket

    lock_path(out).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out))
    assert (out / "config.json").exists() and not lock_path(out).exists()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755  # as any directory, not mkdtemp's 0700


def test_files_that_appear_in_the_output_directory_meanwhile_are_kept(llama_path, tmp_path):
    out = tmp_path / "out"

    class Intruder:
        @hookimpl
        def llmc_finalize(self, state):
            out.mkdir(exist_ok=True)
            (out / "theirs.txt").write_text("not llmc's")

    pm, intruder = get_plugin_manager(), Intruder()
    pm.register(intruder, name="intruder")
    try:
        with pytest.raises(FileExistsError, match="result is in"):
            oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out))
    finally:
        pm.unregister(intruder)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    (kept,) = tmp_path.glob("out.llmc-*")
    assert (kept / "config.json").exists()


def test_the_cli_says_the_directory_is_locked_without_a_traceback(holder, llama_path, tmp_path, capsys):
    from llmc.cli import main

    code = main(["model-free-ptq", str(llama_path), str(tmp_path / "out"), "--scheme", "W4A16"])
    assert code == 2 and f"pid {holder.pid}" in capsys.readouterr().err


@pytest.fixture
def no_model_loading(monkeypatch):
    from llmc.entrypoints import oneshot as entry

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(entry, "preprocess", refuse)


def _files(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: dict(dataset_path=str(t / "absent.jsonl")), "does not exist"),
        (lambda t: dict(dataset_path=_files(t, "empty.jsonl", "")), "could not be read|holds no rows"),
        (lambda t: dict(dataset_path=_files(t, "bad.jsonl", '{"text": "a"}\n{"text": \n')), "could not be read"),
        (lambda t: dict(dataset_path=_files(t, "body.jsonl", '{"body": "a"}\n{"body": "b"}\n')), "no 'text' column"),
        (lambda t: dict(dataset="llmc-docs", device="cuda:7" if torch.cuda.is_available() else "cuda"), "device="),
        (lambda t: dict(dataset="llmc-docs", device="tpu"), "device='tpu'"),
    ],
    ids=["missing-file", "empty-jsonl", "malformed-jsonl", "no-text-column", "absent-accelerator", "unknown-device"],
)
def test_bad_data_and_devices_are_refused_before_the_model_loads(no_model_loading, llama_path, tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):  # the CLI exits 2 on both
        oneshot(model=str(llama_path), recipe=quant_recipe("W4A16", modifier="GPTQModifier"), **make(tmp_path))


def test_non_finite_weights_are_refused_by_both_entry_points(llama_path, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(llama_path, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    message = "model.layers.0.self_attn.o_proj.weight holds 1 NaN or infinite value"
    with pytest.raises(ValueError, match=message):
        oneshot(model=str(src), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "os"))
    with pytest.raises(ValueError, match="(o_proj|up_proj).weight holds 1 NaN"):  # per shard job
        model_free_ptq(src, tmp_path / "mf", "W4A16")
    assert not (tmp_path / "os").exists()
    # left out of the quantization, they are no concern of llmc's
    oneshot(model=str(src), recipe=quant_recipe("W4A16", ignore=("lm_head", "re:.*o_proj", "re:.*up_proj")),
            output_dir=str(tmp_path / "ignored"))


# --- kill -9 at a chosen point, then the same command again --------------------------------

KILLED_MF = """
import sys, time
from pathlib import Path
from llmc.model_free import shards
from llmc import model_free_ptq
def stuck(f, data):
    f.write(bytes(data[: len(data) // 2]))
    Path(sys.argv[3]).write_text("writing")
    time.sleep(60)
shards._write_all = stuck
model_free_ptq(sys.argv[1], sys.argv[2], "W4A16")
"""

KILLED_OS = """
import sys, time
from pathlib import Path
from llmc import oneshot
from llmc.hookspecs import hookimpl
from llmc.plugins import get_plugin_manager
from llmc.saving import save_compressed_tensors
class Stuck:
    @hookimpl
    def llmc_register_savers(self, register):
        def save(model, output_dir, **kwargs):
            save_compressed_tensors(model, output_dir, **kwargs)
            Path(sys.argv[3]).write_text("saving")
            time.sleep(60)
        register("stuck", save)
get_plugin_manager().register(Stuck(), name="stuck")
oneshot(model=sys.argv[1], output_dir=sys.argv[2], saver="stuck",
        recipe={"s": {"q_modifiers": {"QuantizationModifier": {"scheme": "W4A16", "ignore": ["lm_head"]}}}})
"""


def _kill_when(script: str, source, out, tmp_path) -> None:
    kill_when_marked(script, source, out, marker=tmp_path / "marker")


def test_model_free_killed_mid_write_leaves_no_debris_after_the_rerun(llama_path, tmp_path):
    out = tmp_path / "out"
    _kill_when(KILLED_MF, llama_path, out, tmp_path)
    assert list(out.rglob(".*.tmp-*")), "the kill should leave a half-written temporary"
    model_free_ptq(llama_path, out, "W4A16")
    assert not list(out.rglob(".*.tmp-*")) and not lock_path(out).exists()
    assert (out / "config.json").exists()


def test_oneshot_killed_while_saving_leaves_no_debris_after_the_rerun(llama_path, tmp_path):
    out = tmp_path / "out"
    _kill_when(KILLED_OS, llama_path, out, tmp_path)
    assert list(tmp_path.glob(".out.tmp-*")) and not out.exists()  # hidden, never looks complete
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(out))
    assert not list(tmp_path.glob(".out.*")) and (out / "config.json").exists()


def test_model_free_refuses_a_folder_without_config_and_bad_worker_counts(llama_path, tmp_path):
    import shutil

    from llmc.model_free.shards import CheckpointError

    src = tmp_path / "src"
    shutil.copytree(llama_path, src)
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        model_free_ptq(src, tmp_path / "out", "W4A16")
    with pytest.raises(ValueError, match="max_workers must be at least 1"):
        model_free_ptq(llama_path, tmp_path / "out", "W4A16", max_workers=-3)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["W4A16", "FP8_DYNAMIC", "NVFP4A16"])
def test_empty_layers_are_refused_before_any_work(scheme, tmp_path):
    from llmc import tiny

    path = tiny.save_tiny(tmp_path / "empty-mlp", arch="llama", hidden_size=128, intermediate_size=0)
    with pytest.raises(ValueError, match="weight is empty"):
        oneshot(model=str(path), recipe=quant_recipe(scheme), output_dir=str(tmp_path / "os"))
    with pytest.raises(ValueError, match="weight is empty"):
        model_free_ptq(path, tmp_path / "mf", scheme)
    assert not (tmp_path / "os").exists() and not (tmp_path / "mf").exists()


def test_a_corrupt_weights_file_is_a_clear_error(llama_path, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_path, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        oneshot(model=str(src), recipe=quant_recipe("W4A16"))


def test_a_model_that_is_neither_a_path_nor_reachable_fails_fast(monkeypatch, tmp_path):
    import llmc.data

    monkeypatch.setattr(llmc.data, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="out of reach"):
        oneshot(model="no-such-org/no-such-model", recipe=quant_recipe("W4A16"))
    with pytest.raises(ValueError, match="does not exist"):
        oneshot(model="models/tiny/llama", recipe=quant_recipe("W4A16"))  # a relative path
    assert time.perf_counter() - started < 5


def test_text_that_is_not_text_is_refused(no_model_loading, llama_path, tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["fine", None, "also fine"]})
    with pytest.raises(ValueError, match="Row 1 of the 'text' column holds None"):
        oneshot(model=str(llama_path), dataset=rows, recipe=quant_recipe("W4A16", modifier="GPTQModifier"),
                shuffle_calibration_samples=False, num_calibration_samples=3)


def test_a_recipe_file_whose_name_holds_a_colon_is_read_as_a_file(llama_path, tmp_path):
    import yaml

    path = tmp_path / "w4a16:v2.yaml"
    path.write_text(yaml.safe_dump(quant_recipe("W4A16")))
    oneshot(model=str(llama_path), recipe=str(path), output_dir=str(tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").exists()


def test_model_free_warns_of_an_ignore_pattern_that_matches_nothing(llama_path, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        model_free_ptq(llama_path, tmp_path / "out", "W4A16", ignore=["lm_head", "re:.*mlp\\.dwn_proj", "model.layers.9.mlp"])
    assert "'re:.*mlp\\\\.dwn_proj' matches no module" in caplog.text
    assert "'model.layers.9.mlp' matches no module" in caplog.text
    assert "'lm_head' matches no module" not in caplog.text


def test_the_cli_shows_a_traceback_only_when_debugging(llama_path, tmp_path, capsys, monkeypatch):
    from llmc.cli import main

    args = ["model-free-ptq", str(llama_path), str(tmp_path / "out"), "--scheme", "W9A9"]
    assert main(args) == 2 and "Unknown quantization scheme" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown quantization scheme"):
        main(["--debug", *args])
    monkeypatch.setenv("LLMC_DEBUG", "1")
    with pytest.raises(ValueError):
        main(args)


def test_an_unwritable_output_directory_is_refused_before_any_work(no_model_loading, llama_path, tmp_path, monkeypatch):
    import llmc.locking

    monkeypatch.setattr(llmc.locking.os, "access", lambda path, mode: False)  # this runs as root
    with pytest.raises(PermissionError, match="not writable.*nothing was started"):
        oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "out"))
    with pytest.raises(PermissionError, match="not writable"):
        model_free_ptq(llama_path, tmp_path / "mf", "W4A16")


def test_a_full_disk_loses_nothing_and_the_rerun_finishes(llama_path, tmp_path, monkeypatch):
    """ENOSPC injected at the write call: an OS error, no directory that looks complete, the
    input untouched; with space again, the same command finishes."""
    import errno

    import transformers.modeling_utils

    from llmc.model_free import shards

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(shards, "_write_all", full)
        with pytest.raises(OSError, match="No space left"):
            model_free_ptq(llama_path, tmp_path / "mf", "W4A16")
        m.setattr(transformers.modeling_utils, "safe_save_file", full)
        with pytest.raises(OSError, match="No space left"):
            oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "os"))
    assert not (tmp_path / "mf" / "config.json").exists() and not (tmp_path / "os").exists()
    assert not list(tmp_path.glob(".os.*")) and not list((tmp_path / "mf").rglob(".*.tmp-*"))
    model_free_ptq(llama_path, tmp_path / "mf", "W4A16")
    oneshot(model=str(llama_path), recipe=quant_recipe("W4A16"), output_dir=str(tmp_path / "os"))
    assert (tmp_path / "mf" / "config.json").exists() and (tmp_path / "os" / "config.json").exists()


def test_a_layer_two_config_groups_target_is_named(llama_path, caplog):
    import logging

    groups = {
        "int4": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}},
        "int8": {"targets": ["re:.*down_proj$"], "weights": {"num_bits": 8, "strategy": "channel"}},
    }
    recipe = {"s": {"q_modifiers": {"QuantizationModifier": {"config_groups": groups, "ignore": ["lm_head"]}}}}
    with caplog.at_level(logging.WARNING):
        model = oneshot(model=str(llama_path), recipe=recipe)
    assert "model.layers.0.mlp.down_proj (and any other module both match) is targeted by config groups 'int8', 'int4'" in caplog.text
    assert model.model.layers[0].mlp.down_proj.quantization_scheme.weights.num_bits == 8  # the regex wins
    assert caplog.text.count("is targeted by config groups") == 1
    assert "match" not in caplog.text.replace("both match", "")  # no pattern is said to match nothing


def test_targets_that_select_nothing_are_refused_unless_allowed(llama_path, tmp_path, caplog):
    """A recipe whose targets select no module would write a full-precision checkpoint."""
    import logging

    recipe = {"s": {"q_modifiers": {"QuantizationModifier": {"targets": ["re:.*q_prj$"], "scheme": "W4A16"}}}}
    with pytest.raises(ValueError, match=r"select no module of LlamaForCausalLM.*allow_unmatched_targets"):
        oneshot(model=str(llama_path), recipe=recipe, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    everything_ignored = quant_recipe("W4A16", ignore=("lm_head", "re:.*proj$"))
    with pytest.raises(ValueError, match="nothing would be quantized"):
        oneshot(model=str(llama_path), recipe=everything_ignored)
    with caplog.at_level(logging.WARNING):
        model = oneshot(model=str(llama_path), recipe=recipe, allow_unmatched_targets=True)
    assert "nothing would be quantized" in caplog.text
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())
    with pytest.raises(ValueError, match=r"select no weight of .*model\.layers\.0\."):
        model_free_ptq(llama_path, tmp_path / "mf", "W4A16", ignore=["lm_head", "re:.*proj$"])
    assert not (tmp_path / "mf").exists()


def test_finite_weights_whose_sum_overflows_are_not_refused():
    """The finiteness check sums each weight first: finite values summing past the dtype's range
    are tested element by element and pass; a NaN, or an infinity cancelled by another, is found."""
    from llmc.quantization.calibrate import check_finite

    huge = torch.full((4, 8), 3.0e38, dtype=torch.bfloat16)
    assert not torch.isfinite(huge.sum())
    check_finite([("huge", huge)])
    for value in (float("nan"), float("inf")):
        bad = torch.zeros(4, 8, dtype=torch.bfloat16)
        bad[1, 2] = value
        bad[3, 3] = -value
        with pytest.raises(ValueError, match="^bad holds 2 NaN or infinite"):
            check_finite([("fine", huge.clone()), ("bad", bad)])
