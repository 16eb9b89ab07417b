"""What every benchmark shares: machine facts, JSON output, tables, timing hooks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from llmc.hookspecs import hookimpl

RESULTS = Path(os.environ.get("LLMC_BENCH_OUT", Path(__file__).parent / "results"))


def machine() -> dict[str, Any]:
    import compressed_tensors
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["git"] = git_commit()
    return info


def git_commit() -> str | None:
    """The commit the benchmark ran: ``LLMC_GIT_COMMIT`` where set (the device machine's copy
    of the tree may carry a stale .git: its command sets it), else ``git rev-parse``, a tree
    with uncommitted changes marked ``-dirty``."""
    if os.environ.get("LLMC_GIT_COMMIT"):
        return os.environ["LLMC_GIT_COMMIT"]
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return commit + ("-dirty" if dirty else "") if commit else None


def cuda_ms(fn, repeats: int) -> float:
    """Milliseconds per call of ``fn`` on the GPU (CUDA events, after a warm-up call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path


def run_peer_script(script: str, payload: dict[str, Any], peer_path: str) -> dict[str, Any]:
    """Run ``script`` (Python source) in its own process with ``peer_path`` as its only
    PYTHONPATH and ``payload`` as JSON in argv[1]; its ``PEER_RESULT {json}`` line, or the
    error it printed instead."""
    import sys

    env = dict(os.environ, PYTHONPATH=peer_path)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEER_RESULT")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        return {"error": proc.stderr[-500:]}
    return json.loads(line.split(" ", 1)[1])


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def peak_memory() -> dict[str, float | None]:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss, not inherited through fork+exec)."""
    rss = None
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 2**20  # KiB -> GiB
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"peak_rss_gib": rss, "peak_gpu_gib": gpu}


class LayerTimer:
    """A lifecycle plugin: timestamps every sequential layer end (see llmc.hookspecs)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: list[float] = []

    @hookimpl
    def llmc_calibration_start(self, state) -> None:
        self.sync()
        self.start = time.perf_counter()

    @hookimpl
    def llmc_sequential_layer_end(self, state, layer_name, layer) -> None:
        self.sync()
        self.ends.append(time.perf_counter())

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def steady_seconds_per_layer(self) -> float | None:
        """Between consecutive layer ends: one layer's propagation plus the next one's calibration."""
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return sum(gaps) / len(gaps) if gaps else None
