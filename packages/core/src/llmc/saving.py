"""Postprocessing: write a compressed-tensors checkpoint, atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.model_compressors.model_compressor import compress_module
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationStatus, forward_quantize
from compressed_tensors.quantization.utils import is_module_quantized
from tqdm.auto import tqdm

from llmc import distributed
from llmc.locking import output_lock
from llmc.quantization.calibrate import quantized_modules
from llmc.quantization.kernels import eager_kernels
from llmc.quantization.kv_cache import kv_schemes_set_aside, with_attention_schemes
from llmc.reloading import settle_config

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"


def check_output_dir(output_dir: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse, before any work, to write over something that is there."""
    if output_dir is None:
        return
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {str(path)!r} exists and is a file.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(path)!r} exists and is not empty. Choose another directory, "
            "or pass overwrite_output_dir=True to replace it."
        )


def check_output_apart_from_model(output_dir: str | os.PathLike | None, model: Any) -> None:
    """Refuse an output_dir that is the model's own directory, inside it, or above it: replacing
    it (overwrite_output_dir) would delete the input checkpoint."""
    if output_dir is None or not isinstance(model, (str, os.PathLike)) or not Path(model).is_dir():
        return
    out, source = Path(output_dir).expanduser().resolve(), Path(model).expanduser().resolve()
    if out == source or source in out.parents or out in source.parents:
        where = "is" if out == source else "is inside" if source in out.parents else "contains"
        raise ValueError(
            f"output_dir {str(out)!r} {where} the input model's directory {str(source)!r}; saving "
            "there could replace or mix with the checkpoint being read. Choose a directory apart "
            "from the model's."
        )


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike, overwrite: bool = False, merge: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``output_dir``; move it into place on success.

    An interrupted run leaves only the hidden ``.name.tmp-*`` directory, never a
    directory at ``output_dir`` that looks complete, and the next run into ``output_dir``
    removes it (the caller holds the directory's lock). Without ``overwrite``, files that
    appeared in ``output_dir`` meanwhile are kept: the result then stays beside it,
    named in the error. With ``merge`` (transformers' ``save_pretrained`` behaviour), the
    files move into an existing ``output_dir`` instead (see :func:`merge_into`).
    """
    final = Path(output_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    for debris in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        # what a killed run left (the caller holds the directory's lock: no run is writing it)
        logger.info("Removing %s, left by an interrupted run.", debris)
        shutil.rmtree(debris, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # a directory like any other once in place (mkdtemp makes it private)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if merge and final.is_dir():
        merge_into(tmp, final)
        return
    if not overwrite and final.is_dir() and any(final.iterdir()):
        kept = final.parent / f"{final.name}.llmc-{time.strftime('%Y%m%d-%H%M%S')}"
        tmp.rename(kept)
        raise FileExistsError(
            f"{final} was filled by something else while llmc ran; it is left as it is and the "
            f"result is in {kept}."
        )
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(old / "replaced")
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def merge_into(tmp: Path, final: Path) -> None:
    """Move a saved checkpoint's files from ``tmp`` into the existing directory ``final``, as
    transformers' ``save_pretrained`` writes into one: same-named files are replaced (each
    by a rename), other files stay, except weight shards and indexes of an earlier save that
    this one does not hold (they would be loaded with it)."""
    written = {p.name for p in tmp.iterdir()}
    for stale in final.iterdir():
        weights = stale.suffix == ".safetensors" or stale.name.endswith(".safetensors.index.json")
        if weights and stale.name not in written:
            stale.unlink()
    for name in sorted(written):
        target = final / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()


def _fake_quantize_weights(model: torch.nn.Module) -> None:
    for _, module in quantized_modules(model):
        args = module.quantization_scheme.weights
        if args is not None and hasattr(module, "weight"):
            module.weight.data = forward_quantize(module, module.weight.data, "weight", args)


def _model_directory(model: torch.nn.Module) -> Path | None:
    """The local directory the model was loaded from: its path, or its hub cache snapshot
    (looked up in the cache only, never downloaded)."""
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").strip()
    if not source:
        return None
    if os.path.isdir(source):
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a repository id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def copy_python_files(model: torch.nn.Module, output_dir: str | os.PathLike) -> list[str]:
    """Copy the model directory's ``.py`` files (remote code that ``trust_remote_code`` loads
    the checkpoint with) that the saved checkpoint does not already hold, as llm-compressor
    does; returns their names."""
    source = _model_directory(model)
    if source is None:
        return []
    copied = []
    for file in sorted(source.glob("*.py")):
        target = Path(output_dir, file.name)
        if file.is_file() and not target.exists():
            shutil.copy(file, target)
            copied.append(file.name)
    if copied:
        logger.info("Copied the model's code files into the checkpoint: %s", ", ".join(copied))
    return copied


@contextlib.contextmanager
def _compressing_alone() -> Iterator[None]:
    """compressed-tensors compresses collectively inside a process group (each rank some
    modules, then a broadcast); under llmc only rank 0 saves, so it compresses as one process."""
    from compressed_tensors.compressors.model_compressors import model_compressor

    if not distributed.is_distributed():
        yield
        return
    original = model_compressor.is_distributed
    model_compressor.is_distributed = lambda: False
    try:
        yield
    finally:
        model_compressor.is_distributed = original


def _compression_device() -> torch.device | None:
    """Where modules kept on the CPU are compressed: this process's GPU, if it has one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _on_cpu(module: torch.nn.Module) -> bool:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


class _Staging:
    """One reusable pinned buffer that moves a module's tensors between the CPU and a GPU.

    Copies from ordinary (pageable) memory ran at 2 GB/s on the H200 machine, most of an 8B
    model's compression time; a parallel CPU copy into pinned memory and a DMA from there
    are several times faster in each direction."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self._buffer[:size].view(t.dtype).view(t.shape)

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        """Every parameter and buffer of ``module`` (not its children) onto ``device``."""
        for registry in (module._parameters, module._buffers):
            for t in registry.values():
                if t is None or t.device == device:
                    continue
                view = self._view(t)
                view.copy_(t)  # from the GPU: waits for the copy
                if device.type == "cpu":
                    moved = view.clone()
                else:
                    moved = view.to(device, non_blocking=True)
                    torch.cuda.current_stream(device).synchronize()  # before the buffer is reused
                t.data = moved


def compress_on_device(model: torch.nn.Module, compressor: ModelCompressor, device: torch.device | None) -> None:
    """Compress the quantized modules that live on the CPU on ``device``, one at a time, and
    bring the compressed tensors back; compressed-tensors' own pass then skips them.

    Packing an 8B model's weights on the CPU takes a quarter of a minute; on a GPU the
    module's transfers are most of the time. The arithmetic (divide, round, clamp, pack) is
    the same elementwise IEEE operations on either device."""
    if device is None:
        return
    modules = [
        m for m in model.modules()
        if is_module_quantized(m) and getattr(m, "quantization_status", None) != QuantizationStatus.COMPRESSED and _on_cpu(m)
    ]
    staging = _Staging()
    for module in tqdm(modules, desc="Compressing on " + str(device), leave=False, disable=not modules):
        staging.move(module, device)
        compress_module(module, compressor.force_compression_format)
        staging.move(module, torch.device("cpu"))


def save_compressed_tensors(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    processor: Any = None,
    recipe_yaml: str | None = None,
    save_compressed: bool = True,
    quantization_format: str | None = None,
    **save_kwargs: Any,
) -> None:
    """Save ``model`` in compressed-tensors format into the (empty) ``output_dir``.

    ``save_compressed=False`` stores dense, fake-quantized weights with the same
    quantization config (format ``dense``); ``quantization_format`` forces one
    compressed-tensors format on every quantized module. ``save_kwargs`` (e.g.
    ``max_shard_size``) go to transformers' ``save_pretrained``.
    """
    fmt = quantization_format if save_compressed else CompressionFormat.dense.value
    with eager_kernels():
        if not save_compressed:
            _fake_quantize_weights(model)
        with kv_schemes_set_aside(model) as attention_schemes:
            compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
            if compressor.quantization_config is not None:
                compress_on_device(model, compressor, _compression_device())
                with _compressing_alone():
                    compressor.compress_model(model, skip_compressed=True)
        if attention_schemes:
            compressor.quantization_config = with_attention_schemes(compressor.quantization_config, attention_schemes)
    model.save_pretrained(output_dir, **save_kwargs)
    copy_python_files(model, output_dir)
    compressor.update_config(str(output_dir))
    settle_config(Path(output_dir, "config.json"))
    if processor is not None:
        processor.save_pretrained(output_dir)
    if recipe_yaml is not None:
        Path(output_dir, RECIPE_FILE).write_text(recipe_yaml)
    logger.debug("Wrote the %s checkpoint into %s", "compressed" if save_compressed else "dense", output_dir)


def patch_save_pretrained(model: torch.nn.Module, recipe_yaml: str | None = None) -> None:
    """Make ``model.save_pretrained(dir, save_compressed=True)`` write compressed-tensors.

    llm-compressor users save by hand after ``oneshot`` without ``output_dir``; the
    patched method routes through :func:`save_compressed_tensors` (into an atomic
    directory) and leaves every other keyword to transformers' own method.
    """
    original = model.save_pretrained
    if getattr(original, "_llmc_patched", False):
        original = original._llmc_original  # type: ignore[attr-defined]

    def save_pretrained(save_directory: str | os.PathLike, *, save_compressed: bool = True, **kwargs: Any) -> None:
        if not distributed.is_main():  # every rank holds the same model: rank 0 writes it
            logger.info("Rank %d: rank 0 saves %s.", distributed.rank(), save_directory)
            return
        final = Path(save_directory).resolve()
        with output_lock(final), atomic_directory(final, merge=True) as tmp:
            model.save_pretrained = original  # the saver calls transformers' own method
            try:
                save_compressed_tensors(
                    model, tmp, recipe_yaml=recipe_yaml, save_compressed=save_compressed, **kwargs
                )
            finally:
                model.save_pretrained = save_pretrained
        logger.info("Saved to %s", final)

    save_pretrained._llmc_patched = True  # type: ignore[attr-defined]
    save_pretrained._llmc_original = original  # type: ignore[attr-defined]
    model.save_pretrained = save_pretrained
