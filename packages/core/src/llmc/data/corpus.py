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
LARGE_NAME = "llmc-docs-large"
CALIBRATION = "calibration"
EVALUATION = "evaluation"
_EVAL_EVERY = 10  # one paragraph in ten is held out
_SKIPPED_STDLIB_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"}


def _prose(block: str) -> str | None:
    text = " ".join(block.split())
    if len(text) >= 200 and sum(c.isalpha() for c in text) > 0.6 * len(text):
        return text
    return None


@functools.cache
def paragraphs() -> tuple[str, ...]:
    """The language reference topics behind ``help()``: about 0.5 MB of prose."""
    from pydoc_data.topics import topics

    blocks = (block for key in sorted(topics) for block in re.split(r"\n\s*\n", topics[key]))
    return tuple(text for text in map(_prose, blocks) if text)


@functools.cache
def stdlib_docstring_paragraphs() -> tuple[str, ...]:
    """Docstrings of the standard library's own source files, read with ``ast`` (never imported).

    About 0.6 MB more prose; what it holds depends on the Python version.
    """
    import ast
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_STDLIB_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(t for t in map(_prose, re.split(r"\n\s*\n", doc)) if t)
    return tuple(out)


def _held_out(text: str) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return digest[0] % _EVAL_EVERY == 0


def split_texts(split: str, name: str = NAME) -> list[str]:
    """One split of ``llmc-docs`` (the reference topics) or ``llmc-docs-large`` (plus docstrings)."""
    if split not in (CALIBRATION, EVALUATION):
        raise ValueError(f"{name} has splits {CALIBRATION!r} and {EVALUATION!r}, not {split!r}.")
    if name not in (NAME, LARGE_NAME):
        raise ValueError(f"Unknown offline corpus {name!r}; choose {NAME!r} or {LARGE_NAME!r}.")
    texts = paragraphs() + (stdlib_docstring_paragraphs() if name == LARGE_NAME else ())
    want_eval = split == EVALUATION
    return [p for p in dict.fromkeys(texts) if _held_out(p) == want_eval]


def load(dataset_args=None, split: str | None = None) -> datasets.Dataset:
    """The corpus split as a ``datasets.Dataset`` with one ``text`` column."""
    return datasets.Dataset.from_dict({"text": split_texts(split or CALIBRATION)})


def load_large(dataset_args=None, split: str | None = None) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": split_texts(split or CALIBRATION, LARGE_NAME)})
