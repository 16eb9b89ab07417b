"""What a saved checkpoint needs to reload in transformers, settled when its config is written.

Both entry points pass the finished ``config.json`` through :func:`settle_config`:

* compressed-tensors decompresses the microscaled FP formats (NVFP4, MXFP4, ...) to
  bfloat16 whatever the model's dtype, so a float32 or float16 checkpoint of them fails in
  transformers' first forward (float input, bfloat16 weight). The config's dtype becomes
  bfloat16, the dtype vLLM serves these formats in; unquantized tensors load cast to it.
* transformers 5 cannot build a model for an asymmetric pack-quantized checkpoint
  (``W4A16_ASYM``): compressed-tensors creates the zero point unpacked while the file holds
  it packed. The checkpoint is right (vLLM serves it); the warning says what reloads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# compressed-tensors formats whose decompressed weights are bfloat16 whatever the model's dtype
BFLOAT16_FORMATS = {"nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized"}


def _groups(qconfig: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    default = qconfig.get("format")
    return [(group.get("format") or default, group) for group in (qconfig.get("config_groups") or {}).values()]


def settle_config(config_path: Path) -> None:
    """Make ``config_path`` (a saved checkpoint's config.json) reload where it can, and warn
    where transformers cannot reload it."""
    config = json.loads(config_path.read_text())
    qconfig = config.get("quantization_config") or {}
    groups = _groups(qconfig)
    dtype_key = "dtype" if "dtype" in config else "torch_dtype"
    dtype = config.get(dtype_key)
    bf16 = sorted({fmt for fmt, _ in groups if fmt in BFLOAT16_FORMATS})
    if bf16 and dtype not in (None, "bfloat16"):
        logger.warning(
            "%s weights decompress to bfloat16, so config.json's dtype is set to bfloat16 (it was %s): "
            "transformers then loads the whole model in it (a %s forward would fail on bfloat16 weights), "
            "as vLLM serves these formats. Calibrate with precision='bfloat16' to see what is served.",
            ", ".join(bf16), dtype, dtype,
        )
        config[dtype_key] = "bfloat16"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    asymmetric = [
        name for name, (fmt, group) in zip(qconfig.get("config_groups") or {}, groups, strict=True)
        if fmt == "pack-quantized" and (group.get("weights") or {}).get("symmetric") is False
    ]
    if asymmetric:
        logger.warning(
            "Config group(s) %s store asymmetric pack-quantized weights (W4A16_ASYM and the like): vLLM "
            "serves the checkpoint, but transformers 5 cannot reload it (compressed-tensors builds the "
            "zero point unpacked). In Python, load it with llmc.evaluation.load_decompressed(path); for "
            "a checkpoint transformers reloads, use a symmetric scheme (W4A16).",
            ", ".join(asymmetric),
        )
