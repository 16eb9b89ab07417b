"""Pytest fixtures and helpers for testing llmc plugins on tiny local checkpoints.

llmc-core registers this module as a pytest plugin (the ``pytest11`` entry point), so a
plugin's own tests, in any repository, get these fixtures by installing ``llmc-core``:

* ``tokenizer`` — a 2048-token byte-level BPE tokenizer trained on llmc's shipped corpus;
* ``checkpoint_factory`` — ``make(arch)`` saves a tiny checkpoint of a transformers
  architecture ("llama", "qwen2", "qwen3", "mistral", "gemma", "qwen3_moe", "mixtral", ...)
  once per session and returns its folder;
* ``llama_path`` — ``checkpoint_factory("llama")``;
* ``sample_ids`` — a fixed (2, 24) batch of token ids for comparing outputs.

Nothing is downloaded: the checkpoints are built from transformers configs. Importing this
module imports neither torch nor transformers; the fixtures do when first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch


def quant_recipe(scheme: str, ignore: tuple[str, ...] = ("lm_head",), modifier: str = "QuantizationModifier") -> dict:
    """A one-stage recipe quantizing every Linear but ``ignore`` with a preset ``scheme``."""
    return {"quant_stage": {"quant_modifiers": {modifier: {"targets": ["Linear"], "scheme": scheme, "ignore": list(ignore)}}}}


def load_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, by name."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same_tensors(a: Path, b: Path, untied: bool = False) -> None:
    """Two checkpoints hold the same names, dtypes and bits. ``untied``: ``a`` untied a tied
    lm_head (oneshot does), which ``b`` does not store."""
    import torch

    ta, tb = load_checkpoint_tensors(a), load_checkpoint_tensors(b)
    if untied:
        assert torch.equal(ta.pop("lm_head.weight"), ta["model.embed_tokens.weight"])
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from llmc import tiny

    return tiny.build_tokenizer(2048)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``make(arch)`` saves (once per session) a tiny checkpoint of that architecture."""
    from llmc import tiny

    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            tiny.save_tiny(path, arch=arch, hidden_size=128, intermediate_size=256, seed=0)
            cache[arch] = path
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def llama_path(checkpoint_factory: Callable[[str], Path]) -> Path:
    return checkpoint_factory("llama")


@pytest.fixture
def sample_ids() -> torch.Tensor:
    import torch

    return torch.randint(4, 2048, (2, 24), generator=torch.Generator().manual_seed(0))


def needs(module: str) -> pytest.MarkDecorator:
    """Skip a test (or a parameter) unless ``module`` is importable: a plugin's tests that
    also exercise another plugin, e.g. ``pytest.param("GPTQModifier", marks=needs("llmc_gptq"))``."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module} installed")
