"""The one module a plugin author imports: everything here is public and stays stable.

A plugin is a distribution with an entry point in the ``llmc`` group whose module
implements hooks (see :mod:`llmc.hookspecs`, the reference of each hook)::

    from llmc.api import QuantizationModifier, hookimpl

    class MyModifier(QuantizationModifier): ...

    @hookimpl
    def llmc_register_modifiers(register):
        register(MyModifier)

Import from here, not from llmc's other modules (internal, and free to change), and
not from ``llmc.modifiers`` at a plugin module's top (that resolves names through the
registry that is being built while the plugin loads). ``docs/writing-a-plugin.md`` walks
from an empty directory to a published quantizing modifier; ``examples/clip-rtn`` is one.
"""

from __future__ import annotations

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams

from llmc import distributed, tiny, transforms
from llmc.hookspecs import hookimpl
from llmc.lifecycle import State
from llmc.linalg import add_gram, gram, mirror_upper
from llmc.mappings import (
    DENSE_ARCHITECTURES,
    Mapping,
    ResolvedMapping,
    balance_input_source,
    fold_scales,
    inner_mappings,
    norm_mappings,
    phi3_norm_mappings,
    resolve_mappings,
)
from llmc.modifiers.base import Modifier
from llmc.modifiers.quantization import QuantizationModifier
from llmc.naming import RECIPE_NAME
from llmc.observing import input_only
from llmc.patches import ModelPatch
from llmc.pipelines import Pipeline
from llmc.plugins import PluginNotFoundError, get_registry
from llmc.quantization.observers import (
    Observer,
    StaticMinMaxObserver,
    flatten_for_calibration,
    global_scale,
    rounding_error,
    weight_qparams,
    weight_range,
)
from llmc.tensors import map_tensors

__all__ = [
    # hooks and the registry
    "hookimpl",
    "get_registry",
    "PluginNotFoundError",
    # modifiers and what their hooks receive
    "Modifier",
    "QuantizationModifier",
    "State",
    "Pipeline",
    # model patches and smooth/balance mappings
    "ModelPatch",
    "RECIPE_NAME",
    "Mapping",
    "ResolvedMapping",
    "DENSE_ARCHITECTURES",
    "norm_mappings",
    "inner_mappings",
    "phi3_norm_mappings",
    "resolve_mappings",
    "fold_scales",
    "balance_input_source",
    # quantization arithmetic (compressed-tensors' arguments and qparams, llmc's observers)
    "QuantizationArgs",
    "QuantizationScheme",
    "calculate_qparams",
    "Observer",
    "StaticMinMaxObserver",
    "weight_range",
    "weight_qparams",
    "global_scale",
    "rounding_error",
    "flatten_for_calibration",
    # Gram products of calibration inputs (X^T X), float32, upper bands for wide ones
    "gram",
    "add_gram",
    "mirror_upper",
    # data-parallel runs: reduce a modifier's statistics over the ranks (identity in one process)
    "distributed",
    # mark a forward pre-hook that only reads its module's input (see llmc.observing)
    "input_only",
    # nested call arguments; tiny models for a plugin's tests
    "map_tensors",
    "tiny",
    # rotation modifiers: 0.14's transform arguments, a compressed-tensors transform config applied
    "transforms",
]
