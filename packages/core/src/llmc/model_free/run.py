"""``model_free_ptq``: data-free quantization of a safetensors checkpoint, shard by shard."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from tqdm.auto import tqdm

from llmc.locking import output_lock
from llmc.model_free import plan
from llmc.model_free.quantize import quantize_tensors, warm_up
from llmc.model_free.shards import (
    INDEX_NAME,
    Checkpoint,
    CheckpointError,
    atomic_file,
    open_checkpoint,
    read_header,
    read_tensors,
    remove_partial_files,
    write_tensors_atomically,
)
from llmc.patches import checkpoint_converters
from llmc.quantization.config import as_list, build_config, resolve_config_groups, scheme_needs_data
from llmc.reloading import settle_config

logger = logging.getLogger(__name__)

PROGRESS_DIR = ".llmc-model-free"
CONFIG_NAME = "config.json"


@attrs.define
class Summary:
    shards: int = 0
    shards_resumed: int = 0
    quantized: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = attrs.Factory(lambda: {"read": 0.0, "quantize": 0.0, "write": 0.0})
    quantizing: bool = True  # False: tensors only rewritten (reindex_fused_weights, a converter)

    def __str__(self) -> str:
        rate = self.bytes_in / self.seconds / 1e9 if self.seconds else float("nan")
        return (
            f"{self.shards} shards ({self.shards_resumed} already done), "
            + (f"{self.quantized} tensors quantized, {self.kept} kept, " if self.quantizing else f"{self.kept} tensors rewritten, ")
            + f"{self.bytes_in / 1e9:.3f} GB in, "
            f"{self.bytes_out / 1e9:.3f} GB out, {self.seconds:.1f} s ({rate:.2f} GB/s of input; "
            + ", ".join(f"{k} {v:.1f}" for k, v in self.phase_seconds.items())
            + " worker-seconds)"
        )


def resolve_model_stub(model_stub: str | os.PathLike) -> Path:
    """A local folder, or a hub ID fetched (or found in the local cache) by huggingface_hub."""
    path = Path(model_stub)
    if path.is_dir():
        return path.resolve()
    if path.exists() or os.sep in str(model_stub) and str(model_stub).startswith((".", os.sep, "~")):
        raise FileNotFoundError(f"model_stub {str(model_stub)!r} is not a folder of safetensors files.")
    from huggingface_hub import snapshot_download

    from llmc.data import hub_reachable

    patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.py", "*.jinja"]
    try:
        local = snapshot_download(str(model_stub), allow_patterns=patterns, local_files_only=not hub_reachable())
    except Exception as exc:
        raise FileNotFoundError(
            f"model_stub {str(model_stub)!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub or found in its local cache ({type(exc).__name__}). Pass the path "
            "of a downloaded checkpoint."
        ) from exc
    return Path(local).resolve()


def _check_output(root: Path, save_directory: str | os.PathLike) -> Path:
    out = Path(save_directory).expanduser().resolve()
    if out == root or root in out.parents:
        raise ValueError(
            f"save_directory {str(out)!r} is the input checkpoint or inside it; model_free_ptq never "
            "writes into model_stub. Choose a directory outside it."
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_directory {str(out)!r} exists and is a file.")
    return out


def resolve_scheme(scheme: QuantizationScheme | str | dict, ignore: Iterable[str]) -> QuantizationConfig:
    """The config that every quantized tensor follows; refuses schemes that need data."""
    if isinstance(scheme, QuantizationScheme):
        groups = {"group_0": scheme}
    else:
        groups = resolve_config_groups(scheme, None, None)
    for name, group in groups.items():
        if scheme_needs_data(group):
            raise ValueError(
                f"Scheme {scheme if isinstance(scheme, str) else name!r} quantizes activations "
                "statically, which needs calibration data; model_free_ptq is data-free. Use "
                "oneshot(..., dataset=...) for it, or a dynamic/weight-only scheme here "
                "(FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, MXFP4, W4A16, W8A16, ...)."
            )
        if group.weights is None:
            raise ValueError(f"Scheme group {name!r} quantizes no weights; model_free_ptq quantizes weights.")
        group.format = infer_module_format(torch.nn.Linear, group).value
    return build_config(groups, as_list(ignore))


def resolve_converters(converter: Any) -> list[Any]:
    """``converter``: None, a registered name, a Converter object, or a list of them."""
    if converter is None:
        return []
    items = converter if isinstance(converter, (list, tuple)) else [converter]
    resolved = []
    for item in items:
        if isinstance(item, str):
            from llmc.plugins import get_registry

            item = get_registry().get("converter", item)()
        if not callable(getattr(item, "process", None)):
            raise TypeError(f"converter {item!r} has no process(tensors) method; see compressed_tensors' Converter.")
        resolved.append(item)
    return resolved


def _partners(converters: Sequence[Any], checkpoint: Checkpoint, fused: bool) -> Callable[[str], list[str]] | None:
    fused_of = plan.fused_partners(checkpoint.weight_map) if fused else None
    if fused_of is None and not converters:
        return None

    def partners(name: str) -> list[str]:
        found = list(fused_of(name)) if fused_of else []
        for c in converters:
            if hasattr(c, "get_dependencies"):
                try:
                    found.extend(c.get_dependencies(name))
                except NotImplementedError:
                    pass
        return found

    return partners


def _convert(tensors: dict[str, torch.Tensor], converters: Sequence[Any], validate: bool) -> dict[str, torch.Tensor]:
    for c in converters:
        tensors = c.validate(tensors) if validate and hasattr(c, "validate") else c.process(tensors)
    return tensors


@attrs.frozen
class _Progress:
    """Per-shard completion records that let an interrupted run resume."""

    out: Path
    fingerprint: str

    @property
    def directory(self) -> Path:
        return self.out / PROGRESS_DIR

    def check(self) -> None:
        """Refuse a non-empty save_directory unless it is this very run, unfinished."""
        run_file = self.directory / "run.json"
        if not (self.out.is_dir() and any(self.out.iterdir())):
            return
        if not run_file.is_file():
            raise FileExistsError(
                f"save_directory {str(self.out)!r} exists and is not empty. Choose another "
                "directory or remove it."
            )
        if json.loads(run_file.read_text())["fingerprint"] != self.fingerprint:
            raise FileExistsError(
                f"save_directory {str(self.out)!r} holds an unfinished model_free_ptq run with other "
                "arguments or another input. Remove it, or re-run with the same arguments to finish it."
            )
        logger.info("Resuming the unfinished run in %s", self.out)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "run.json").write_text(json.dumps({"fingerprint": self.fingerprint}))

    def _record(self, shard: str) -> Path:
        return self.directory / (shard.replace("/", "__") + ".json")

    def done(self, out: Path, shard: str) -> dict[str, Any] | None:
        """The shard's record if its file is complete and matches it, else None."""
        record_path, path = self._record(shard), out / shard
        if not record_path.is_file() or not path.is_file():
            return None
        record = json.loads(record_path.read_text())
        try:
            if path.stat().st_size != record["file_bytes"] or set(read_header(path)) != set(record["tensors"]):
                return None
        except CheckpointError:
            return None
        return record

    def mark(self, shard: str, record: dict[str, Any]) -> None:
        with atomic_file(self._record(shard)) as tmp:
            tmp.write_text(json.dumps(record))


def _fingerprint(checkpoint: Checkpoint, config: QuantizationConfig | None, converters: Sequence[Any]) -> str:
    stats = {s: [(st := (checkpoint.root / s).stat()).st_size, st.st_mtime_ns] for s in checkpoint.headers}
    body = {
        "root": str(checkpoint.root),
        "shards": stats,
        "config": config.model_dump(mode="json") if config is not None else None,
        "converters": [type(c).__qualname__ for c in converters],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _copy_atomically(src: Path, dst: Path) -> None:
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write_json_atomically(data: dict[str, Any], dst: Path) -> None:
    with atomic_file(dst) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available; pass device='cpu' or omit it.")
    return device


def _warm_device(weights: list[tuple[QuantizationScheme, torch.Size, torch.dtype]], device: torch.device) -> threading.Event:
    """Set once a warm-up thread has started CUDA and loaded the kernels for ``weights``
    (already set on a CPU): jobs wait for it before they quantize."""
    ready = threading.Event()
    if device.type != "cuda" or not weights:
        ready.set()
        return ready

    def run() -> None:
        try:
            warm_up(weights, device)
        except Exception:  # a real job will report the same problem properly
            logger.debug("model_free warm-up failed", exc_info=True)
        finally:
            ready.set()

    threading.Thread(target=run, name="llmc-warm-up", daemon=True).start()
    return ready


def _run_jobs(fn: Callable[[plan.Job], Any], jobs: Sequence[plan.Job], workers: int, desc: str) -> list[Any]:
    bar = tqdm(total=len(jobs), desc=desc, unit="shard")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = []
        for result in pool.map(fn, jobs):
            results.append(result)
            bar.update()
    bar.close()
    return results


def process_checkpoint(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    config: QuantizationConfig | None,
    **options: Any,
) -> Summary:
    """Rewrite every shard of ``model_stub`` into ``save_directory``, quantizing with ``config``.

    ``config=None`` only moves tensors (``reindex_fused_weights``). The config
    (and index) are written last, so a directory without them is unfinished. One run
    at a time writes a directory (:func:`llmc.locking.output_lock`).
    """
    root = resolve_model_stub(model_stub)
    out = _check_output(root, save_directory)
    with output_lock(out):
        return _process(root, out, config, **options)


def _process(
    root: Path,
    out: Path,
    config: QuantizationConfig | None,
    *,
    max_workers: int = 1,
    device: torch.device | str | None = None,
    converters: Sequence[Any] = (),
    group_fused: bool = False,
) -> Summary:
    start = time.perf_counter()
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}.")
    exec_device = _resolve_device(device)
    checkpoint = open_checkpoint(root)
    if (config is not None or converters) and not (root / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{root} has no {CONFIG_NAME}: the quantized checkpoint's config.json is the model's own "
            "with a quantization_config added, which nothing could load without the rest. Put the "
            "model's config.json beside its shards."
        )
    if config is not None:  # what oneshot's model patches change (fused MoE experts, say)
        converters = [*converters, *checkpoint_converters(root)]
    jobs = plan.plan_jobs(checkpoint, _partners(converters, checkpoint, group_fused))

    groups = dict(config.config_groups) if config is not None else {}
    group_of = {id(scheme): name for name, scheme in groups.items()}

    def validate(job: plan.Job) -> set[tuple[str, torch.Size, torch.dtype]]:
        """Fail before any work on a shape the scheme cannot take; (group, shape, dtype) of
        each weight to quantize."""
        metas = {n: checkpoint.info(n).meta() for n in job.names}
        metas = _convert(metas, converters, validate=True)
        if config is None:
            return set()
        fused.extend(plan.fused_stacks(metas, config.ignore or []))
        selected = plan.select_quantizable(metas, config, where=job.shard)
        return {(group_of[id(scheme)], metas[n].shape, metas[n].dtype) for n, scheme in selected.items()}

    if config is not None:
        _warn_unmatched_ignore(config.ignore or [], checkpoint.weight_map)
    progress = _Progress(out, _fingerprint(checkpoint, config, converters))
    progress.check()
    if out.is_dir() and (removed := remove_partial_files(out)):
        logger.info("Removed %d half-written file(s) an interrupted run left: %s", len(removed), ", ".join(removed[:3]))
    fused: list[str] = []  # fused expert stacks left as they are, found while validating
    kinds = sorted(set().union(*_run_jobs(validate, jobs, max_workers, "Validating")), key=str)
    if fused:
        logger.warning(
            "%d fused weight stacks (%s) are left unquantized: no installed model patch splits them "
            "for this checkpoint's architecture. Add them to ignore to say so, or install one that does "
            "(llmc-moe splits transformers' MoE families).", len(fused), ", ".join(sorted(fused)[:3]),
        )
    if config is not None and not kinds:
        targets = sorted({t for scheme in groups.values() for t in scheme.targets})
        raise ValueError(
            f"The scheme's targets {targets} (ignore {list(config.ignore or [])}) select no weight of "
            f"{root}: the output would not be quantized at all. Check the ignore patterns (module "
            f"names look like {_example_module(checkpoint.weight_map)}) or the scheme."
        )
    # the warm-up overlaps the file copies and the first reads
    warmed = _warm_device([(groups[g], shape, dtype) for g, shape, dtype in kinds], exec_device)
    device_lock = threading.Lock() if exec_device.type == "cuda" else contextlib.nullcontext()
    progress.start()
    for rel in checkpoint.other_files:
        if rel != CONFIG_NAME:
            _copy_atomically(root / rel, out / rel)

    summary = Summary(shards=len(jobs), bytes_in=checkpoint.nbytes, quantizing=config is not None)

    def run(job: plan.Job) -> dict[str, Any]:
        record = progress.done(out, job.shard)
        if record is not None:
            return {**record, "resumed": True}
        clock = time.perf_counter()
        tensors = read_tensors(checkpoint, job.reads, pinned=exec_device.type == "cuda")
        tensors = _convert(tensors, converters, validate=False)
        selected = plan.select_quantizable(tensors, config, where=job.shard) if config is not None else {}
        kept = len(tensors) - len(selected)
        phases = {"read": time.perf_counter() - clock}
        if selected:
            warmed.wait()
            # One job at a time on a GPU (measured faster than a stream per worker); the
            # others read and write meanwhile.
            with device_lock:
                tensors = quantize_tensors(tensors, selected, exec_device)
        phases["quantize"] = time.perf_counter() - clock - phases["read"]
        file_bytes = write_tensors_atomically(tensors, out / job.shard)
        phases["write"] = time.perf_counter() - clock - phases["read"] - phases["quantize"]
        record = {
            "phases": phases,
            "tensors": {n: t.numel() * t.element_size() for n, t in tensors.items()},
            "file_bytes": file_bytes,
            "quantized": len(selected),
            "kept": kept,
        }
        progress.mark(job.shard, record)
        return record

    weight_map: dict[str, str] = {}
    total = 0
    for job, record in zip(jobs, _run_jobs(run, jobs, max_workers, "Quantizing" if config else "Rewriting"), strict=True):
        resumed = bool(record.get("resumed"))
        summary.shards_resumed += resumed
        summary.quantized += record["quantized"]
        summary.kept += record["kept"]
        summary.bytes_out += record["file_bytes"]
        for phase, seconds in record["phases"].items():
            summary.phase_seconds[phase] += 0.0 if resumed else seconds  # spent by an earlier run
        total += sum(record["tensors"].values())
        weight_map.update(dict.fromkeys(record["tensors"], job.shard))

    _write_json_atomically({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, out / INDEX_NAME)
    _write_config(root, out, config, converters)
    shutil.rmtree(progress.directory, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    logger.info("model_free: %s -> %s: %s", root, out, summary)
    return summary


def _example_module(tensor_names: Iterable[str]) -> str:
    matrices = [n.rpartition(".")[0] for n in tensor_names if n.endswith(".weight") and "proj" in n]
    return matrices[0] if matrices else next(iter(tensor_names), "?").rpartition(".")[0]


def _warn_unmatched_ignore(ignore: Iterable[str], tensor_names: Iterable[str]) -> None:
    """An ignore pattern that names no module of the checkpoint is almost always a typo (class
    names, which a checkpoint does not record, cannot be checked)."""
    modules = {name.rpartition(".")[0] for name in tensor_names}
    for pattern in ignore:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            matched = any(regex.match(m) for m in modules)
        elif "." in pattern:  # a bare name may be a class, or a tied lm_head the file omits
            matched = pattern in modules
        else:
            continue  # a class name
        if not matched:
            logger.warning("ignore pattern %r matches no module of the checkpoint; check the spelling.", pattern)


def _write_config(root: Path, out: Path, config: QuantizationConfig | None, converters: Sequence[Any]) -> None:
    """config.json, last: the input's, with the converters' and our quantization config."""
    source = root / CONFIG_NAME
    if config is None and not converters:
        if source.is_file():
            _copy_atomically(source, out / CONFIG_NAME)
        return
    model_config = json.loads(source.read_text())
    existing = model_config.pop("quantization_config", None)
    qconfig = QuantizationConfig.model_validate(existing) if existing else None
    for c in converters:
        if hasattr(c, "update_config"):
            qconfig = c.update_config(qconfig)
        if hasattr(c, "update_model_config"):
            model_config = c.update_model_config(model_config)
    if config is not None:
        config = config.model_copy(deep=True)
        config.quantization_status = QuantizationStatus.COMPRESSED
        formats = {g.format for g in config.config_groups.values()}
        config.format = formats.pop() if len(formats) == 1 else "mixed-precision"
        if qconfig is None:
            qconfig = config
        else:
            qconfig.merge(config)
    staging = out / f".{CONFIG_NAME}.staging"
    staging.mkdir(exist_ok=True)
    (staging / CONFIG_NAME).write_text(json.dumps(model_config))
    if qconfig is not None:
        ModelCompressor(quantization_config=qconfig).update_config(str(staging))
        settle_config(staging / CONFIG_NAME)
    os.replace(staging / CONFIG_NAME, out / CONFIG_NAME)
    shutil.rmtree(staging, ignore_errors=True)


def model_free_ptq(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    scheme: QuantizationScheme | str,
    ignore: Iterable[str] = (),
    max_workers: int = 1,
    device: torch.device | str | None = None,
    converter: Any = None,
) -> Summary:
    """Quantize a safetensors checkpoint without building the model.

    Data-free schemes only (FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, MXFP4, W4A16, ...).
    ``ignore`` takes module names and ``re:`` regexes; norms, embeddings and
    non-matrix tensors are never quantized. Each shard is quantized by one of
    ``max_workers`` threads on ``device`` (CUDA if available); NVFP4 weights
    that share a global scale are gathered into one job even across shards.
    Re-running with the same arguments after an interruption finishes the job.
    """
    config = resolve_scheme(scheme, ignore)
    converters = resolve_converters(converter)
    return process_checkpoint(
        model_stub,
        save_directory,
        config,
        max_workers=max_workers,
        device=device,
        converters=converters,
        group_fused=plan.needs_fused_scales(config),
    )
