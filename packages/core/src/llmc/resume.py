"""Progress kept beside the output, so that a crashed ``oneshot`` resumes.

With ``output_dir`` set, the sequential pipeline saves, every ``resume_interval``
seconds (and no more often than keeps the saving under a tenth of the run, judged
by the bytes to write and the rate the last save reached), each
finished layer's tensors, what its modifiers keep of it, and the hidden states the
next layer starts from, in ``.<name>.llmc-resume`` beside ``output_dir``. The same
command run again after a kill restores the finished layers and calibrates from
the next one: the checkpoint it writes is byte-identical to an uninterrupted
run's, since every layer after the restored ones sees the very same inputs.

"The same command" is checked, not assumed: the progress records a fingerprint
of the recipe, the arguments, the model's files and the library versions, and
progress with another fingerprint is discarded. A successful save removes it.

Layout: ``fingerprint.json``; one ``run-<i>`` folder per sequential pipeline run
of the command (in order: ``independent`` may run several), each holding
``layer-<k>.safetensors`` per saved layer, ``hidden-<n>.safetensors`` (layer
``n``'s inputs) and ``progress.json`` (``{"done": n}``), written last: a kill
between two files leaves the previous progress intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

_EXTRA = "llmc.modifier."  # prefix of a modifier's own tensors in a layer file
# what a first save is assumed to reach, to judge whether it is worth its time: a local SSD's
# sustained write rate, which later saves replace with their own
_ASSUMED_WRITE_RATE = 1e9


def resume_path(output_dir: str | os.PathLike) -> Path:
    final = Path(output_dir).expanduser().resolve()
    return final.parent / f".{final.name}.llmc-resume"


class Unfingerprintable(Exception):
    """An argument whose identity cannot be recorded (a loaded model, a DataLoader)."""


def _describe(value: Any) -> Any:
    """A JSON-able identity of an argument value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    fingerprint = getattr(value, "_fingerprint", None)  # a datasets.Dataset
    if isinstance(fingerprint, str):
        return {"dataset": fingerprint}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    raise Unfingerprintable(type(value).__name__)


def _files(path: Any) -> list[Any]:
    """Name, size and modification time of a local model's or dataset's files."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        return []
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [[str(p.relative_to(root) if root.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(arguments: Mapping[str, Any], recipe_yaml: str, device: torch.device) -> str | None:
    """What makes a rerun "the same command"; None when an argument has no recordable identity
    (the run then keeps no progress)."""
    try:
        described = {name: _describe(value) for name, value in sorted(arguments.items())}
    except Unfingerprintable as exc:
        logger.info("No resumable progress is kept: the %s argument cannot be recognised on a rerun.", exc)
        return None
    identity = {
        "arguments": described,
        "recipe": recipe_yaml,
        "model_files": _files(arguments.get("model")),
        "dataset_files": _files(arguments.get("dataset_path")),
        "device": str(device),
        "versions": {n: _version(n) for n in ("torch", "transformers", "compressed-tensors", "llmc-core")},
        "threads": torch.get_num_threads(),  # CPU results depend on how work is split
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file, flushed to disk, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResumeStore:
    """The progress of one command, beside its output directory."""

    def __init__(self, root: Path, fingerprint: str, interval: float) -> None:
        self.root, self.fingerprint, self.interval = root, fingerprint, interval
        self._runs = 0
        recorded = root / "fingerprint.json"
        if root.exists():
            try:
                same = json.loads(recorded.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                logger.warning("Discarding the progress in %s: it was kept for a different command.", root)
                shutil.rmtree(root)

    @classmethod
    def open(
        cls, output_dir: str | os.PathLike, fingerprint: str | None, interval: float, enabled: bool = True
    ) -> ResumeStore | None:
        """The store beside ``output_dir``; None (and any old progress removed) when disabled."""
        root = resume_path(output_dir)
        if not enabled or fingerprint is None:
            if root.exists():
                logger.info("Removing the progress of an earlier run in %s (not resuming).", root)
                shutil.rmtree(root)
            return None
        return cls(root, fingerprint, interval)

    def sequential_run(self, layer_names: Sequence[str]) -> SequentialProgress:
        """The progress of the command's next sequential pipeline run (runs come in order)."""
        self._runs += 1
        return SequentialProgress(self, self.root / f"run-{self._runs - 1}", list(layer_names))

    def prepare(self) -> None:
        """Create the store, stamped with the command's fingerprint, before its first save."""
        if not self.root.exists():
            self.root.mkdir(parents=True)
            _write(self.root / "fingerprint.json", lambda p: p.write_text(json.dumps({"fingerprint": self.fingerprint})))

    def skip_run(self) -> None:
        """A sequential run that keeps no progress still takes its place in the order."""
        self._runs += 1

    def remove(self) -> None:
        """The output is saved: nothing is left to resume."""
        shutil.rmtree(self.root, ignore_errors=True)


class SequentialProgress:
    """One sequential pipeline run's saved layers: what a rerun restores, and when to save."""

    def __init__(self, store: ResumeStore, root: Path, layer_names: list[str]) -> None:
        self.store, self.root, self.names, self.interval = store, root, layer_names, store.interval
        self.done = 0  # layers whose state a rerun restores
        self._saved = 0  # layers on disk (this run's or an earlier one's)
        state = root / "progress.json"
        if state.exists():
            kept = json.loads(state.read_text())
            if kept.get("layers") == layer_names:
                self.done = self._saved = int(kept["done"])
        self._since = time.monotonic()
        self._rate = _ASSUMED_WRITE_RATE  # bytes per second the last save reached
        self._sizes: dict[int, int] = {}  # bytes of each finished layer, counted once

    # --- restoring ----------------------------------------------------------
    def restore_layer(self, index: int, layer: torch.nn.Module) -> dict[int, dict[str, torch.Tensor]]:
        """Load layer ``index``'s saved tensors into ``layer``; returns each modifier's (by
        position) own tensors."""
        tensors: dict[str, torch.Tensor] = {}
        extras: dict[int, dict[str, torch.Tensor]] = {}
        with safe_open(self.root / f"layer-{index}.safetensors", framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(_EXTRA):
                    position, name = key.removeprefix(_EXTRA).split(".", 1)
                    extras.setdefault(int(position), {})[name] = f.get_tensor(key)
                else:
                    tensors[key] = f.get_tensor(key)
        layer.load_state_dict(tensors, strict=True)
        return extras

    def hidden(self) -> Iterator[torch.Tensor]:
        """The saved inputs of the first layer not restored, batch by batch."""
        with safe_open(self.root / f"hidden-{self.done}.safetensors", framework="pt") as f:
            for index in range(len(f.keys())):
                yield f.get_tensor(f"batch.{index}")

    # --- saving ---------------------------------------------------------------
    def due(self, done: int, layers: Sequence[torch.nn.Module], hidden: Sequence[torch.Tensor] | None) -> bool:
        """Whether to save now what :meth:`save` would: ``interval`` seconds passed since the
        last save, and ten times what this save should take (``interval`` 0: every layer)."""
        if self.interval == 0:
            return True
        elapsed = time.monotonic() - self._since
        if elapsed < self.interval:
            return False
        for k in range(self._saved, done):
            if k not in self._sizes:
                self._sizes[k] = _nbytes(layers[k].state_dict().values())
        size = sum(self._sizes[k] for k in range(self._saved, done))
        size += _nbytes(hidden or ())
        return elapsed >= 10 * size / self._rate

    def save(
        self,
        done: int,
        layers: Sequence[torch.nn.Module],
        extras: Callable[[int], Mapping[int, Mapping[str, torch.Tensor]]],
        hidden: Sequence[torch.Tensor] | None,
    ) -> None:
        """Save layers ``[saved, done)`` (``extras(k)``: each modifier's own tensors of layer
        ``k``) and, unless every layer is done, ``hidden`` (layer ``done``'s inputs)."""
        started = time.monotonic()
        written = 0
        self.store.prepare()
        self.root.mkdir(exist_ok=True)
        for index in range(self._saved, done):
            tensors = dict(layers[index].state_dict())
            for position, kept in extras(index).items():
                tensors.update({f"{_EXTRA}{position}.{k}": v for k, v in kept.items()})
            tensors = _plain(tensors)
            _write(self.root / f"layer-{index}.safetensors", lambda p, t=tensors: save_file(t, p))
            written += _nbytes(tensors.values())
        if hidden is not None:
            batches = _plain({f"batch.{i}": t for i, t in enumerate(hidden)})
            _write(self.root / f"hidden-{done}.safetensors", lambda p: save_file(batches, p))
            written += _nbytes(batches.values())
        state = {"done": done, "layers": self.names}
        _write(self.root / "progress.json", lambda p: p.write_text(json.dumps(state)))
        for stale in self.root.glob("hidden-*.safetensors"):
            if stale.name != f"hidden-{done}.safetensors":
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        self._saved = done
        self._since = time.monotonic()
        seconds = self._since - started
        self._rate = max(written / max(seconds, 1e-3), 1.0)
        logger.info("Progress saved after %d of %d layers (%.2f GB, %.1f s) in %s",
                    done, len(self.names), written / 1e9, seconds, self.root)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, each alone in its storage (safetensors refuses strided tensors
    and storage that two share, as tied weights or one observed range kept twice do)."""
    plain: dict[str, torch.Tensor] = {}
    taken: list[tuple[int, int]] = []  # memory ranges kept so far
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        alone = tensor.is_contiguous() and not any(s < end and start < e for s, e in taken)
        plain[name] = tensor if alone else tensor.contiguous().clone()
        if alone:
            taken.append((start, end))
    return plain
