"""Which tensors each shard job reads, quantizes and writes.

A job writes one output shard. Tensors that must be processed together (the
q/k/v or gate/up weights that share an NVFP4 global scale, or a converter's
dependencies) are moved into one job, the one whose shard already holds most
of them: the job reads its partners from other shards by name, and no tensor is
read by two jobs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping

import attrs
import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
)
from compressed_tensors.utils import match_quantizable_tensors

from llmc.model_free.shards import Checkpoint, CheckpointError
from llmc.quantization.calibrate import fused_group_key
from llmc.quantization.config import check_weight_shape

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMBEDDING_LEAVES = ("embed_tokens", "embeddings", "word_embeddings", "wte", "wpe", "embed_positions")


@attrs.frozen
class Job:
    shard: str  # output file, named like the input shard it mostly comes from
    reads: Mapping[str, tuple[str, ...]]  # input shard -> tensor names

    @property
    def names(self) -> list[str]:
        return [n for names in self.reads.values() for n in names]


def needs_fused_scales(config: QuantizationConfig) -> bool:
    return any(
        s.weights is not None and s.weights.strategy == QuantizationStrategy.TENSOR_GROUP
        for s in config.config_groups.values()
    )


def _components(names: Iterable[str], partners: Callable[[str], Iterable[str]]) -> list[set[str]]:
    """Connected groups of tensors under the ``partners`` relation (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    names = list(names)
    known = set(names)
    for name in names:
        for other in partners(name):
            if other in known:
                parent[find(name)] = find(other)
    groups: dict[str, set[str]] = defaultdict(set)
    for name in names:
        groups[find(name)].add(name)
    return list(groups.values())


def fused_partners(names: Iterable[str]) -> Callable[[str], list[str]]:
    """Every tensor of a module is a partner of every tensor of its fused siblings."""
    by_group: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        key = fused_group_key(name.rpartition(".")[0])
        if key is not None:
            by_group[key].append(name)

    def partners(name: str) -> list[str]:
        key = fused_group_key(name.rpartition(".")[0])
        return by_group.get(key, []) if key is not None else []

    return partners


def plan_jobs(checkpoint: Checkpoint, partners: Callable[[str], Iterable[str]] | None) -> list[Job]:
    owner = dict(checkpoint.weight_map)
    if partners is not None:
        for group in _components(checkpoint.weight_map, partners):
            shards = Counter(checkpoint.weight_map[n] for n in group)
            if len(shards) > 1:
                home = min(shards, key=lambda s: (-shards[s], s))
                for name in group:
                    owner[name] = home
    reads: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, shard in checkpoint.weight_map.items():
        reads[owner[name]][shard].append(name)
    return [
        Job(shard, {src: tuple(sorted(names)) for src, names in sorted(by_src.items())})
        for shard, by_src in sorted(reads.items())
    ]


def select_quantizable(
    tensors: Mapping[str, torch.Tensor], config: QuantizationConfig, where: str
) -> dict[str, QuantizationScheme]:
    """The weights to quantize and each one's scheme (first matching group wins).

    Norms, embeddings and tensors that are not 2-D matrices are never quantized;
    a targeted weight that is not floating point is refused (``where`` names the file).
    """
    selected: dict[str, QuantizationScheme] = {}
    for scheme in config.config_groups.values():
        for module_name, name in match_quantizable_tensors(tensors, config.ignore, scheme.targets):
            tensor = tensors[name]
            if name in selected or tensor.ndim != 2:
                continue
            if module_name.rpartition(".")[2] in EMBEDDING_LEAVES:
                continue
            if tensor.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{where}: {name} has dtype {tensor.dtype}; model_free_ptq quantizes "
                    "float32/float16/bfloat16 weights. If the checkpoint is already quantized, "
                    "pass a converter that dequantizes it, or add the module to ignore."
                )
            if scheme.weights is not None:
                check_weight_shape(module_name, tuple(tensor.shape), scheme.weights)
            selected[name] = scheme
    return selected


def fused_stacks(tensors: Mapping[str, torch.Tensor], ignore: Iterable[str]) -> list[str]:
    """Stacks of weight matrices (three or more dimensions longer than one: fused MoE experts)
    that no converter split and ``ignore`` does not name: no scheme quantizes them."""
    from compressed_tensors.utils import is_match

    ignore = list(ignore)
    return [
        name
        for name, tensor in tensors.items()
        if sum(size > 1 for size in tensor.shape) >= 3
        and tensor.dtype in FLOAT_DTYPES
        and "embed" not in name.lower()
        and not is_match(name.rpartition(".")[0], None, ignore)
        and not is_match(name, None, ignore)
    ]
