"""Helpers shared by the cross-package tests."""

from __future__ import annotations


def kill_when_marked(script: str, *args: object, marker) -> None:
    """Run ``script`` (``python -c``) with ``args`` then ``marker``'s path, and SIGKILL it once
    it writes ``marker`` (the point it was told to stop at): nothing of it cleans up."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args[:2]), str(marker), *map(str, args[2:])])
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the run never reached the point to kill it at"
    finally:
        proc.kill()
        proc.wait()
