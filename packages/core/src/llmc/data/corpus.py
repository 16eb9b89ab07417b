"""The offline default corpus: English text from Python's own bundled documentation.

``pydoc_data.topics`` ships with CPython (the language reference topics behind
``help()``), so the demo, tests and benchmarks calibrate and evaluate on real
prose with no download. Paragraphs are split deterministically into a
calibration part and a held-out evaluation part that calibration never sees.
"""

from __future__ import annotations

import functools
import hashlib
import re

import datasets

NAME = "llmc-docs"
CALIBRATION = "calibration"
EVALUATION = "evaluation"
_EVAL_EVERY = 10  # one paragraph in ten is held out


@functools.cache
def paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) >= 200 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                out.append(text)
    return tuple(out)


def _held_out(text: str) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return digest[0] % _EVAL_EVERY == 0


def split_texts(split: str) -> list[str]:
    if split not in (CALIBRATION, EVALUATION):
        raise ValueError(f"{NAME} has splits {CALIBRATION!r} and {EVALUATION!r}, not {split!r}.")
    want_eval = split == EVALUATION
    return [p for p in paragraphs() if _held_out(p) == want_eval]


def load(dataset_args=None, split: str | None = None) -> datasets.Dataset:
    """The corpus split as a ``datasets.Dataset`` with one ``text`` column."""
    return datasets.Dataset.from_dict({"text": split_texts(split or CALIBRATION)})
