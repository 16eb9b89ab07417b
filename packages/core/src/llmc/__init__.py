"""llmc: compress Hugging Face LLMs into compressed-tensors checkpoints.

Entry points: :func:`oneshot`, :func:`model_free_ptq` (and :func:`reindex_fused_weights`). Modifiers: ``from llmc.modifiers import ...``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["oneshot", "model_free_ptq", "reindex_fused_weights", "__version__"]


def oneshot(**kwargs: Any):
    from llmc.entrypoints.oneshot import oneshot as _oneshot

    return _oneshot(**kwargs)


def _describe_oneshot() -> None:
    """help(llmc.oneshot) and interactive completion show the real keyword arguments (static
    tools read them from ``__init__.pyi``), built from the argument classes."""
    import inspect

    from llmc.args import oneshot_doc, oneshot_parameters

    oneshot.__signature__ = inspect.Signature(oneshot_parameters())  # type: ignore[attr-defined]
    oneshot.__doc__ = oneshot_doc()


_describe_oneshot()


def model_free_ptq(*args: Any, **kwargs: Any):
    """Quantize a safetensors checkpoint with a data-free scheme, without building the model.

    Takes llm-compressor's model_free_ptq arguments; see :mod:`llmc.model_free`.
    """
    from llmc.model_free import model_free_ptq as _model_free_ptq

    return _model_free_ptq(*args, **kwargs)


def reindex_fused_weights(*args: Any, **kwargs: Any):
    """Rewrite a checkpoint so fused weight groups share a shard; see :mod:`llmc.model_free`."""
    from llmc.model_free import reindex_fused_weights as _reindex

    return _reindex(*args, **kwargs)
