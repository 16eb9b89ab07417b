"""model_free_ptq and reindex_fused_weights: straight on safetensors shards."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmc import model_free_ptq, oneshot, reindex_fused_weights, tiny
from llmc.cli import main as cli_main
from llmc.model_free import quantize as mf_quantize
from llmc.model_free import shards
from llmc.model_free.shards import CheckpointError
from llmc.quantization.calibrate import fused_group_key
from llmc.testing import assert_same_tensors, load_checkpoint_tensors, quant_recipe


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def oneshot_reference(src: Path, out: Path, scheme: str) -> Path:
    oneshot(model=str(src), recipe=quant_recipe(scheme, ignore=["lm_head"]), output_dir=str(out))
    return out


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny Llama saved in many small shards, so that q/k/v and gate/up groups are split."""
    path = tmp_path_factory.mktemp("sharded-llama")
    model = tiny.build_model(tiny.build_config("llama", hidden_size=128, intermediate_size=256))
    model.save_pretrained(path, max_shard_size="100KB")
    tiny.build_tokenizer(2048).save_pretrained(path)
    return path


def split_groups(folder: Path) -> int:
    """How many fused groups have members in more than one shard."""
    index = json.loads((folder / shards.INDEX_NAME).read_text())["weight_map"]
    homes: dict[tuple, set[str]] = {}
    for name, shard in index.items():
        key = fused_group_key(name.rpartition(".")[0])
        if key is not None:
            homes.setdefault(key, set()).add(shard)
    return sum(len(h) > 1 for h in homes.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "NVFP4A16", "W4A16", "FP8_DYNAMIC", "MXFP4"])
def test_bit_identical_to_oneshot(checkpoint_factory, tmp_path, arch, scheme):
    src = checkpoint_factory(arch)
    before = digest(src)
    reference = oneshot_reference(src, tmp_path / "oneshot", scheme)
    summary = model_free_ptq(src, tmp_path / "free", scheme, ignore=["lm_head"])

    assert_same_tensors(reference, tmp_path / "free", untied=arch == "gemma")
    assert quantization_config(reference) == quantization_config(tmp_path / "free")
    assert summary.quantized == 14  # 7 Linear layers in each of 2 decoder layers
    assert digest(src) == before  # the input checkpoint is never modified
    assert (tmp_path / "free" / "tokenizer.json").is_file()
    assert not list((tmp_path / "free").glob(".*"))  # no temporary or progress files left


def test_transformers_loads_the_output(llama_path, tmp_path, sample_ids):
    out = tmp_path / "free"
    model_free_ptq(llama_path, out, "FP8_DYNAMIC", ignore=["lm_head"])
    reference = oneshot_reference(llama_path, tmp_path / "oneshot", "FP8_DYNAMIC")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = transformers.AutoModelForCausalLM.from_pretrained(reference)
    with torch.no_grad():
        logits = loaded(sample_ids).logits
        torch.testing.assert_close(logits, expected(sample_ids).logits, rtol=0, atol=0)
    dense = transformers.AutoModelForCausalLM.from_pretrained(llama_path)
    with torch.no_grad():
        assert (logits - dense(sample_ids).logits).abs().mean() < 0.1 * dense(sample_ids).logits.abs().mean()


def test_nvfp4_fused_groups_split_across_shards(sharded_llama, tmp_path, monkeypatch):
    assert split_groups(sharded_llama) > 0, "the fixture must split some fused group"
    reads: list[str] = []
    original = shards.read_tensors

    def counting(checkpoint, wanted, **kwargs):
        reads.extend(n for names in wanted.values() for n in names)
        return original(checkpoint, wanted, **kwargs)

    monkeypatch.setattr("llmc.model_free.run.read_tensors", counting)
    model_free_ptq(sharded_llama, tmp_path / "free", "NVFP4A16", ignore=["lm_head"], max_workers=3)

    index = json.loads((sharded_llama / shards.INDEX_NAME).read_text())["weight_map"]
    assert sorted(reads) == sorted(index)  # every tensor read exactly once
    # global scales shared across each group, equal to oneshot on the whole model
    reference = oneshot_reference(sharded_llama, tmp_path / "oneshot", "NVFP4A16")
    assert_same_tensors(reference, tmp_path / "free")
    assert split_groups(tmp_path / "free") == 0
    out = load_checkpoint_tensors(tmp_path / "free")
    q, k = (out[f"model.layers.0.self_attn.{p}.weight_global_scale"] for p in ("q_proj", "k_proj"))
    assert torch.equal(q, k)


def test_reindex_fused_weights(sharded_llama, tmp_path):
    summary = reindex_fused_weights(sharded_llama, tmp_path / "reindexed", num_workers=2)
    assert summary.quantized == 0
    assert split_groups(tmp_path / "reindexed") == 0
    assert_same_tensors(sharded_llama, tmp_path / "reindexed")
    assert json.loads((tmp_path / "reindexed" / "config.json").read_text()) == json.loads(
        (sharded_llama / "config.json").read_text()
    )
    model_free_ptq(tmp_path / "reindexed", tmp_path / "a", "NVFP4A16")
    model_free_ptq(sharded_llama, tmp_path / "b", "NVFP4A16")
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


def test_mixtral_experts_share_global_scales(tmp_path):
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    summary = model_free_ptq(tmp_path / "src", tmp_path / "out", "NVFP4A16", ignore=["lm_head", "re:.*gate$"])
    out = load_checkpoint_tensors(tmp_path / "out")
    assert summary.quantized == 4 + 4 * 3  # attention projections + 3 per expert; router ignored
    assert "model.layers.0.block_sparse_moe.gate.weight" in out
    for e in range(4):
        prefix = f"model.layers.0.block_sparse_moe.experts.{e}"
        assert torch.equal(out[f"{prefix}.w1.weight_global_scale"], out[f"{prefix}.w3.weight_global_scale"])
        assert not torch.equal(out[f"{prefix}.w1.weight_global_scale"], out[f"{prefix}.w2.weight_global_scale"])


def test_interrupted_run_resumes(sharded_llama, tmp_path, monkeypatch):
    out = tmp_path / "free"
    calls = {"n": 0}
    original = mf_quantize.quantize_tensors

    def flaky(tensors, selected, device):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(tensors, selected, device)

    monkeypatch.setattr("llmc.model_free.run.quantize_tensors", flaky)
    with pytest.raises(KeyboardInterrupt):
        model_free_ptq(sharded_llama, out, "W4A16", ignore=["lm_head"])
    assert not (out / "config.json").exists() and not (out / shards.INDEX_NAME).exists()
    assert not list(out.glob(".*.tmp*"))
    done = sorted(p.name for p in out.glob("*.safetensors"))
    assert done

    monkeypatch.setattr("llmc.model_free.run.quantize_tensors", original)
    with pytest.raises(FileExistsError, match="other arguments"):
        model_free_ptq(sharded_llama, out, "W8A16", ignore=["lm_head"])
    assert len(done) >= 2
    damaged = out / done[0]  # a finished shard cut short after its record was written is redone
    damaged.write_bytes(damaged.read_bytes()[:-8])
    summary = model_free_ptq(sharded_llama, out, "W4A16", ignore=["lm_head"])
    assert summary.shards_resumed == len(done) - 1
    model_free_ptq(sharded_llama, tmp_path / "clean", "W4A16", ignore=["lm_head"])
    assert_same_tensors(tmp_path / "clean", out)
    assert (out / "config.json").is_file()


class TransposedQ:
    """A test converter: a 'foreign' format that stores q_proj transposed as ``weight_t``."""

    def process(self, tensors):
        return {
            (k.removesuffix("_t") if k.endswith(".weight_t") else k): (v.T.contiguous() if k.endswith(".weight_t") else v)
            for k, v in tensors.items()
        }

    def validate(self, tensors):
        return {
            (k.removesuffix("_t") if k.endswith(".weight_t") else k): (v.T if k.endswith(".weight_t") else v)
            for k, v in tensors.items()
        }

    def update_config(self, config):
        return config


def test_converter_turns_foreign_format_into_the_same_output(llama_path, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(llama_path, foreign)
    tensors = load_file(foreign / "model.safetensors")
    tensors = {
        (k + "_t" if "q_proj" in k else k): (v.T.contiguous() if "q_proj" in k else v) for k, v in tensors.items()
    }
    save_file(tensors, foreign / "model.safetensors", metadata={"format": "pt"})
    model_free_ptq(foreign, tmp_path / "a", "FP8_BLOCK", ignore=["lm_head"], converter=TransposedQ())
    model_free_ptq(llama_path, tmp_path / "b", "FP8_BLOCK", ignore=["lm_head"])
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


def test_registered_converters_resolve_by_name():
    from compressed_tensors.entrypoints.convert.converters import ModelOptNvfp4Converter

    from llmc.model_free.run import resolve_converters

    assert isinstance(resolve_converters("modelopt-nvfp4")[0], ModelOptNvfp4Converter)
    with pytest.raises(LookupError, match="Unknown converter 'modelopt'.*modelopt-nvfp4"):
        resolve_converters("modelopt")


# --- bad input: clear errors before any work, input untouched -----------------


def test_refuses_output_inside_input(llama_path):
    with pytest.raises(ValueError, match="never writes into model_stub"):
        model_free_ptq(llama_path, llama_path / "out", "FP8_BLOCK")
    with pytest.raises(ValueError, match="never writes into model_stub"):
        model_free_ptq(llama_path, llama_path, "FP8_BLOCK")


def test_refuses_schemes_that_need_data(llama_path, tmp_path):
    with pytest.raises(ValueError, match="(?s)needs calibration data.*oneshot"):
        model_free_ptq(llama_path, tmp_path / "out", "FP8")
    with pytest.raises(ValueError, match="Unknown quantization scheme"):
        model_free_ptq(llama_path, tmp_path / "out", "FP9")
    assert not (tmp_path / "out").exists()


def test_refuses_nonempty_output(llama_path, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        model_free_ptq(llama_path, tmp_path / "out", "FP8_BLOCK")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_shape_that_does_not_fit_the_scheme(llama_path, tmp_path):
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 96}}}
    with pytest.raises(ValueError, match="not divisible by the scheme's group/block size 96"):
        model_free_ptq(llama_path, tmp_path / "out", scheme)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(sharded_llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sharded_llama, src)
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated"):
        model_free_ptq(src, tmp_path / "out", "FP8_BLOCK")
    victim.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt"):
        model_free_ptq(src, tmp_path / "out", "FP8_BLOCK")
    assert not (tmp_path / "out").exists()


def test_a_header_whose_byte_ranges_disagree_with_dtype_and_shape_is_refused(llama_path, tmp_path):
    """A tensor's dtype edited F32 -> F16 in the header, byte for byte: its declared range no
    longer fits its shape, and everything after it would be read shifted."""
    import json
    import struct

    src = tmp_path / "src"
    shutil.copytree(llama_path, src)
    path = src / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = "model.layers.0.mlp.down_proj.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "F16"
    edited = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # same header length
    path.write_bytes(data[:8] + edited + data[8 + length :])
    with pytest.raises(CheckpointError, match=f"corrupt header; tensor '{name}' \\(F16"):
        model_free_ptq(src, tmp_path / "out", "FP8_BLOCK")
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_named(sharded_llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sharded_llama, src)
    victim = sorted(src.glob("*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"not in .*{victim.name}"):
        model_free_ptq(src, tmp_path / "out", "FP8_BLOCK")


def test_already_quantized_weights_are_refused(llama_path, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llama_path, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].to(torch.int8)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: model.layers.0.mlp.down_proj.weight has dtype torch.int8"):
        model_free_ptq(src, tmp_path / "out", "FP8_BLOCK")


def test_no_safetensors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="No \\*.safetensors files"):
        model_free_ptq(tmp_path / "src", tmp_path / "out", "FP8_BLOCK")


def test_cli(sharded_llama, tmp_path, capsys):
    assert cli_main(["model-free-ptq", str(sharded_llama), str(tmp_path / "a"), "--scheme", "NVFP4A16",
                     "--ignore", "lm_head", "--max-workers", "2"]) == 0
    logged = capsys.readouterr()
    assert logged.err.count("tensors quantized") == 1 and not logged.out  # the summary, once
    assert cli_main(["reindex-fused-weights", str(sharded_llama), str(tmp_path / "reindexed")]) == 0
    logged = capsys.readouterr().err
    assert logged.count("tensors rewritten") == 1 and "quantized" not in logged
    model_free_ptq(sharded_llama, tmp_path / "b", "NVFP4A16", ignore=["lm_head"])
    assert_same_tensors(tmp_path / "a", tmp_path / "b")
    assert split_groups(tmp_path / "reindexed") == 0
    assert cli_main(["model-free-ptq", str(sharded_llama), str(tmp_path / "c"), "--scheme", "NVFP4"]) == 2
    assert "calibration data" in capsys.readouterr().err


def test_safetensors_header_reader_agrees_with_safetensors(sharded_llama):
    for path in sharded_llama.glob("*.safetensors"):
        infos = shards.read_header(path)
        with safe_open(str(path), "pt") as f:
            assert set(infos) == set(f.keys())
            for name in f.keys():
                t = f.get_tensor(name)
                assert infos[name].shape == tuple(t.shape)
                assert infos[name].nbytes == t.numel() * t.element_size()
                assert infos[name].meta().dtype == t.dtype


def test_shard_writer_writes_the_bytes_save_file_writes(tmp_path):
    """Shards are written from tensor memory, in safetensors' own layout: same bytes as save_file."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w.weight": torch.randn(24, 40, generator=gen).to(torch.bfloat16),
        "w.weight_scale": torch.rand(3, 5, generator=gen),
        "w.weight_packed": torch.randint(0, 255, (24, 20), dtype=torch.uint8, generator=gen),
        "w.zero_point": torch.randint(-8, 8, (24, 1), dtype=torch.int8, generator=gen),
        "fp8": torch.randn(8, 16, generator=gen).to(torch.float8_e4m3fn),
        "half": torch.randn(7, generator=gen).half(),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "shape": torch.tensor([11, 13], dtype=torch.int64),
        "ints": torch.arange(5, dtype=torch.int32),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(6, 4, generator=gen).t(),
    }
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    size = shards.write_tensors_atomically(tensors, ours)
    save_file({k: v.contiguous() for k, v in tensors.items()}, theirs, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes() and size == ours.stat().st_size
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(TypeError, match="complex64"):
        shards.write_tensors_atomically({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_to_host_keeps_every_tensor_and_dtype():
    """The one-copy device-to-host transfer, including odd byte offsets between dtypes."""
    tensors = {
        "packed": torch.arange(7, dtype=torch.uint8),
        "scale": torch.randn(3, 5).to(torch.bfloat16),
        "global": torch.randn(4),
        "shape": torch.tensor([11, 13], dtype=torch.int64),
    }
    host = mf_quantize._to_host(tensors)
    for name, t in tensors.items():
        assert host[name].dtype == t.dtype and torch.equal(host[name], t), name


def test_warm_up_quantizes_one_weight_of_every_kind(monkeypatch):
    """The GPU warm-up quantizes a weight of each (scheme, shape, dtype) the checkpoint holds,
    for every scheme model_free accepts."""
    from llmc.model_free import quantize
    from llmc.model_free.run import resolve_scheme

    seen = []
    original = quantize.quantize_tensors

    def recording(tensors, selected, device):
        ((name, weight),) = tensors.items()
        shape, dtype = weight.shape, weight.dtype
        out = original(tensors, selected, device)
        seen.append((shape, dtype, f"{name}_scale" in out))
        return out

    monkeypatch.setattr(quantize, "quantize_tensors", recording)
    schemes = ("FP8_BLOCK", "NVFP4A16", "W4A16", "W8A16", "MXFP4", "FP8_DYNAMIC")
    kinds = [(torch.Size((256, 512)), torch.bfloat16), (torch.Size((128, 256)), torch.float16)]
    for scheme in schemes:
        (group,) = resolve_scheme(scheme, []).config_groups.values()
        quantize.warm_up([(group, shape, dtype) for shape, dtype in kinds], torch.device("cpu"))
    assert seen == [(shape, dtype, True) for _ in schemes for shape, dtype in kinds]


@pytest.mark.parametrize("scheme", ["W4A16", "W8A16"])
def test_packed_weights_are_compressed_tensors_own_rounding(llama_path, tmp_path, scheme):
    """Every stored integer and scale, recomputed from the original weight with a plain
    min/max per group (or row) and compressed-tensors' calculate_qparams and quantize."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import preset_name_to_scheme, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    out = tmp_path / "free"
    model_free_ptq(llama_path, out, scheme, ignore=["lm_head"])
    stored, original = load_checkpoint_tensors(out), load_checkpoint_tensors(llama_path)
    args = preset_name_to_scheme(scheme, ["Linear"]).weights
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = original[f"{name}.weight"]
        size = args.group_size or w.shape[1]
        blocks = w.reshape(w.shape[0], -1, size)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
        expected = quantize(w, scale, zero, args)
        torch.testing.assert_close(stored[f"{name}.weight_scale"], scale.to(stored[f"{name}.weight_scale"].dtype), rtol=0, atol=0)
        values = unpack_from_int32(stored[f"{name}.weight_packed"], args.num_bits, w.shape)
        assert torch.equal(values, expected.to(values.dtype)), name


def test_eager_kernels_switch_is_scoped_and_shared_by_threads():
    """Compression runs compressed-tensors' eager kernels inside the block, and only there."""
    import threading

    from compressed_tensors.utils import impl_backend

    from llmc.quantization.kernels import eager_kernels

    before = impl_backend.ENFORCE_EAGER
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with eager_kernels():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(10)
    with pytest.raises(RuntimeError):
        with eager_kernels():
            assert impl_backend.ENFORCE_EAGER is True
            raise RuntimeError
    assert impl_backend.ENFORCE_EAGER is True  # the worker's block is still open
    release.set()
    thread.join()
    assert impl_backend.ENFORCE_EAGER == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares a GPU run with a CPU run")
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "NVFP4A16", "W4A16", "MXFP4"])
def test_gpu_and_cpu_write_the_same_bytes(sharded_llama, tmp_path, scheme):
    model_free_ptq(sharded_llama, tmp_path / "cpu", scheme, ignore=["lm_head"], device="cpu")
    model_free_ptq(sharded_llama, tmp_path / "gpu", scheme, ignore=["lm_head"], max_workers=2, device="cuda")
    assert_same_tensors(tmp_path / "cpu", tmp_path / "gpu")


def test_a_fused_stack_no_patch_splits_is_named_in_a_warning(llama_path, tmp_path, caplog):
    """A 3-D stack of expert matrices that no installed model patch splits (an architecture
    transformers cannot build) is left unquantized, and the run says which; ignored, it is not."""
    source = tmp_path / "source"
    shutil.copytree(llama_path, source)
    shard = next(source.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.randn(4, 64, 128)
    save_file(tensors, shard, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="llmc.model_free.run"):
        model_free_ptq(str(source), str(tmp_path / "out"), scheme="W8A16", ignore=["lm_head"])
    assert "1 fused weight stacks (model.layers.0.mlp.experts.gate_up_proj) are left unquantized" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmc.model_free.run"):
        model_free_ptq(str(source), str(tmp_path / "ignored"), scheme="W8A16", ignore=["lm_head", "re:.*experts$"])
    assert "fused weight stacks" not in caplog.text
