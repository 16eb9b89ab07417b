"""One run per output directory.

Both entry points write into a directory they own for the whole run: a lock file
beside it (``.<name>.llmc-lock``) says who (process, host, start, command). A
second run into the same directory refuses, naming the first; a lock whose
process is gone (on this host) is stale and is taken over, so a killed run never
blocks the rerun that resumes or replaces it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class OutputLockedError(FileExistsError):
    """Another llmc run is writing the same output directory."""


def lock_path(output_dir: str | os.PathLike) -> Path:
    final = Path(output_dir).expanduser().resolve()
    return final.parent / f".{final.name}.llmc-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(owner: dict) -> bool:
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))


def _refuse_unwritable(output_dir: str | os.PathLike, exc: OSError | None) -> None:
    raise PermissionError(
        f"Cannot write {output_dir}: its parent directory is not writable"
        + (f" ({exc.strerror})" if exc is not None else "")
        + ". Choose an output directory you can write to; nothing was started."
    ) from None


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike | None) -> Iterator[None]:
    """Hold the output directory's lock for the block (nothing to lock without a directory)."""
    if output_dir is None:
        yield
        return
    path = lock_path(output_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        _refuse_unwritable(output_dir, exc)
    if not os.access(path.parent, os.W_OK):
        _refuse_unwritable(output_dir, None)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)[:500]}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as exc:
            _refuse_unwritable(output_dir, exc)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner and _stale(owner):
                logger.warning("Taking over the lock of a run that is gone (pid %s, started %s).",
                               owner.get("pid"), owner.get("started"))
                path.unlink(missing_ok=True)
                continue
            raise OutputLockedError(
                f"{Path(output_dir)} is being written by another llmc run (pid {owner.get('pid', '?')} "
                f"on {owner.get('host', '?')}, started {owner.get('started', '?')}: "
                f"{owner.get('command', '?')}). Wait for it to finish or choose another output "
                f"directory; if that run is gone, delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - three stale takeovers lost in a row to other runs
        raise OutputLockedError(f"Could not take the lock {path}; another run keeps taking it.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
