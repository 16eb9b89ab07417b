"""What attention's first calls cost, and whether a call made first on another thread spares them.

torch's ``scaled_dot_product_attention`` prefers cuDNN on Hopper; its first calls set it up
with the GPU idle. Each mode runs in a fresh process: ``none`` times the first calls of a
few shapes on the main thread; ``thread`` first makes one call (1 × 512 tokens, 32 query and 8
key/value heads of 128) on another thread, as ``llmc_pipelines.warming`` does; ``thread-other``
makes it with another shape (2 × 320 tokens, 32 key/value heads). Prints a table and writes JSON.

    python -m benchmarks.attention_first_call      # GPU machine
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import table, write_json

CHILD = r"""
import json, sys, threading, time
import torch
import torch.nn.functional as F

def call(b, s, kv=8):
    q = torch.randn(b, s, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).contiguous()
    k = torch.randn(b, s, kv, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).contiguous()
    v = torch.randn(b, s, kv, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != 32)

def ms(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3

torch.zeros(1, device="cuda")
mode, rows = sys.argv[1], []
if mode != "none":
    box = {}
    shape = (1, 512, 8) if mode == "thread" else (2, 320, 32)
    thread = threading.Thread(target=lambda: box.update(ms=ms(call(*shape))))
    thread.start(); thread.join()
    rows.append({"mode": mode, "thread": "warm-up", "shape": "x".join(map(str, shape)), "ms": box["ms"]})
for b, s in ((1, 512), (1, 512), (1, 777), (16, 512), (1, 2048)):
    rows.append({"mode": mode, "thread": "main", "shape": f"{b}x{s}x8", "ms": ms(call(b, s))})
print(json.dumps(rows))
"""


def main() -> None:
    rows = []
    for mode in ("none", "thread", "thread-other"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    print(table(rows, ["mode", "thread", "shape", "ms"]))
    print(f"wrote {write_json('attention_first_call', {'rows': rows})}")


if __name__ == "__main__":
    main()
