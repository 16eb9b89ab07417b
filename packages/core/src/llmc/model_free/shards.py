"""Safetensors checkpoints read as shards of named tensors, never as a model.

Headers are parsed here so that a truncated or corrupt file is reported with
its name before any tensor is read, and so that a job reads exactly the byte
ranges it needs into one buffer. Shards are written here too, in the same
layout ``safetensors.torch.save_file`` writes, but straight from the tensors'
memory: ``save_file`` first copies the whole shard into bytes while holding the
GIL, which stalls every other worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf")
MAX_HEADER_BYTES = 100 * 1024 * 1024

# In the order of safetensors' dtype enum, which sorts a written file's tensors.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
}


class CheckpointError(ValueError):
    """The checkpoint on disk is not what model_free_ptq can read."""


@attrs.frozen
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # of the first byte in the file

    def meta(self) -> torch.Tensor:
        """A meta tensor of this shape and dtype, for checks that need no data."""
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{self.name}: dtype {self.dtype} is not supported.")
        return torch.empty(self.shape, dtype=DTYPES[self.dtype], device="meta")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's name, dtype and shape, checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header).")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (declares {length} header "
                f"bytes in a file of {size}). Re-download or re-save this shard."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}).") from exc
    data_bytes = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            info = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), end - begin, 8 + length + begin)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}.") from exc
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated; tensor {name!r} ends at byte {end} of a data section of "
                f"{data_bytes} bytes. Re-download or re-save this shard."
            )
        dtype = DTYPES.get(info.dtype)
        expected = None if dtype is None else math.prod(info.shape) * dtype.itemsize
        if begin < 0 or (expected is not None and info.nbytes != expected):
            raise CheckpointError(
                f"{path}: corrupt header; tensor {name!r} ({info.dtype}, shape {list(info.shape)}) "
                f"needs {expected} bytes but its data_offsets [{begin}, {end}] span {info.nbytes}. "
                "Re-download or re-save this shard."
            )
        infos[name] = info
    return infos


@attrs.frozen
class Checkpoint:
    """A folder of safetensors shards: which shard holds which tensor."""

    root: Path
    headers: Mapping[str, Mapping[str, TensorInfo]]  # shard file -> tensor name -> info
    weight_map: Mapping[str, str]  # tensor name -> shard file
    other_files: tuple[str, ...]  # relative paths copied verbatim (config, tokenizer, ...)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for h in self.headers.values() for i in h.values())

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.weight_map[name]][name]


def _other_files(root: Path, shards: Iterable[str]) -> tuple[str, ...]:
    skip = {INDEX_NAME, *shards}
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel in skip or any(p.startswith(".") for p in rel.split("/")):
            continue
        if rel.endswith(".safetensors") or rel.endswith(WEIGHTS_SUFFIXES):
            logger.warning("Not copying weights file %s: it is not part of the checkpoint's index.", rel)
            continue
        files.append(rel)
    return tuple(files)


def open_checkpoint(root: Path) -> Checkpoint:
    """Read the index (if any) and every shard header; fail on the first inconsistency."""
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            index_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc}).") from exc
        shards = sorted(set(index_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path} names shard(s) that are not in {root}: {', '.join(missing)}. "
                "The download is incomplete; fetch the missing files."
            )
    else:
        index_map = {}
        shards = sorted(p.relative_to(root).as_posix() for p in root.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"No *.safetensors files in {root}. model_free_ptq reads safetensors checkpoints; "
                "re-save the model with save_pretrained(safe_serialization=True)."
            )
    headers = {shard: read_header(root / shard) for shard in shards}
    weight_map: dict[str, str] = {}
    for shard, infos in headers.items():
        for name in infos:
            if name in weight_map:
                raise CheckpointError(f"Tensor {name!r} is stored twice: in {weight_map[name]} and {shard}.")
            weight_map[name] = shard
    for name, shard in index_map.items():
        if weight_map.get(name) != shard:
            raise CheckpointError(f"{index_path} maps {name!r} to {shard}, but that shard does not hold it.")
    return Checkpoint(root, headers, weight_map, _other_files(root, shards))


def read_tensors(
    checkpoint: Checkpoint, wanted: Mapping[str, Iterable[str]], pinned: bool = False
) -> dict[str, torch.Tensor]:
    """Read only the named tensors of each shard (partial reads) into one host buffer per shard.

    Adjacent tensors are read with one call; every tensor is a view of the buffer.
    ``pinned`` buffers (for a CUDA device) come from torch's pinned-memory cache: they
    are resident, so reading fills them without page faults, and the copies to the
    device run at full speed without blocking the reading thread.
    """
    tensors: dict[str, torch.Tensor] = {}
    for shard, names in wanted.items():
        infos = sorted((checkpoint.headers[shard][n] for n in names), key=lambda i: i.offset)
        buffer = torch.empty(sum(i.nbytes for i in infos), dtype=torch.uint8, pin_memory=pinned)
        view = memoryview(buffer.numpy())
        runs: list[list[int]] = []  # [file offset, buffer position, length] of adjacent tensors
        position = 0
        for info in infos:
            if runs and info.offset == runs[-1][0] + runs[-1][2]:
                runs[-1][2] += info.nbytes
            else:
                runs.append([info.offset, position, info.nbytes])
            position += info.nbytes
        with (checkpoint.root / shard).open("rb", buffering=0) as f:
            for offset, start, length in runs:
                _read_exactly(f, offset, view[start : start + length], checkpoint.root / shard)
        tensors.update(typed_views(buffer, ((i.name, DTYPES[i.dtype], i.shape) for i in infos)))
    return tensors


def typed_views(
    buffer: torch.Tensor, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """The tensors packed back to back in a uint8 ``buffer``, as views where alignment allows."""
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        raw = buffer[position : position + size]
        position += size
        if raw.storage_offset() % dtype.itemsize:  # an odd-sized tensor before it
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def _read_exactly(f: Any, offset: int, into: memoryview, path: Path) -> None:
    f.seek(offset)
    done = 0
    while done < len(into):
        n = f.readinto(into[done:])
        if not n:
            raise CheckpointError(f"{path}: file ended early while reading tensor data.")
        done += n


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path``; rename it into place if the block succeeds.

    A file at ``path`` is therefore either absent or complete, never half written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial_files(folder: Path) -> list[str]:
    """Delete the half-written temporaries (:func:`atomic_file`) a killed run left in
    ``folder``; only safe while holding the folder's lock."""
    removed = []
    for tmp in folder.rglob(".*.tmp-*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp.relative_to(folder)))
    return removed


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[torch.Tensor]]:
    """The serialized header and the tensors in the order safetensors writes them: by dtype,
    last of its enum first, then by name (so the bytes equal ``save_file``'s)."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    for name, tensor in tensors.items():
        if tensor.dtype not in names:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be written to safetensors here.")
    rank = {dtype: i for i, dtype in enumerate(DTYPES.values())}
    ordered = sorted(tensors.items(), key=lambda item: (-rank[item[1].dtype], item[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(raw)) + raw, [t for _, t in ordered]


def write_tensors_atomically(tensors: Mapping[str, torch.Tensor], path: Path) -> int:
    """Write a safetensors shard through :func:`atomic_file`; its size.

    Each tensor's bytes go to the file straight from its (host) memory: no serialized
    copy of the shard is built, and the writes release the GIL, so workers that write
    overlap workers that quantize.
    """
    head, ordered = _header(tensors, {"format": "pt"})
    with atomic_file(path) as tmp:
        with tmp.open("wb", buffering=0) as f:
            f.write(head)
            for tensor in ordered:
                if tensor.numel():
                    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                    _write_all(f, memoryview(data.numpy()))
    return path.stat().st_size


def _write_all(f: Any, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += f.write(data[done:])
