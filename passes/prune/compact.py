"""``compact-sparse``: store N:M-sparse linear weights as values + packed indices, read through ``densify``.

Requires: verified IR. Candidates are stored f32 ``[N, K]`` weights that every function reads only
as the weight operand of ``linear`` nodes (a weight read any other way, e.g. a tied embedding table,
would have to stay stored dense too, so it is left alone).

Each candidate is loaded and checked (the pass trusts no pruning stats): among the ``patterns``
(``"1:2,2:4,4:8"``: the ones the CPU kernel computes; any ``n:m`` may be listed) that the weight
holds exactly (at most ``n`` nonzeros in every group of ``m`` inputs, ``m`` dividing ``K``), the one
storing the fewest bytes is chosen, and only when that is fewer than the dense f32 ``4*N*K``.

Guarantees: each chosen weight gets derived weights ``<weight>.<n>of<m>.values`` (f32) and
``.indices`` (u32) in a NEW WeightStore (old entries kept, computed when loaded), and every linear
reading it reads ``densify(values, indices) {n, m, out_features, in_features}`` instead (one
``densify`` per weight and function). ``densify`` rebuilds the weight exactly, so every function
computes bit-for-bit what it did. The original weight node stays; ``dce`` drops it.

Stats: ``compacted`` linears, ``weights_compacted``, ``dense_bytes`` and ``compact_bytes`` of the
compacted weights, ``not_sparse`` candidates that hold no pattern or would not save bytes,
``not_linear_only`` f32 matrices also read other than as a linear weight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...ir.graph import Builder, Function, Module, Node, weight_reads
from ...ir.sparse_format import NMFormat, parse_nm
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from ..base import Pass, PassResult, map_functions
from ..rewrite import rebuild, renamed

LINEAR_WEIGHT = ("linear", 1)


def best_format(w: np.ndarray, formats: list[NMFormat]) -> NMFormat | None:
    """The format of ``formats`` that ``w`` holds and that stores it in the fewest bytes, if fewer
    than dense f32; None otherwise."""
    n, k = w.shape
    fitting = [fmt for fmt in formats if fmt.holds(w)]
    best = min(fitting, key=lambda fmt: fmt.stored_bytes(n, k), default=None)
    return best if best is not None and best.stored_bytes(n, k) < 4 * n * k else None


class _LazyCompression:
    """One weight's values and indices, computed when the first is loaded, freed once both were."""

    def __init__(self, store: WeightStore, source: str, fmt: NMFormat):
        self.store, self.source, self.fmt = store, source, fmt
        self.cached: dict[str, np.ndarray] = {}

    def load(self, part: str) -> np.ndarray:
        if part not in self.cached:  # first load (or a part asked for again): compress the weight
            values, indices = self.fmt.compress(self.store.get(self.source))
            self.cached = {"values": values, "indices": indices}
        return self.cached.pop(part)


@dataclass(frozen=True)
class CompactSparse(Pass):
    """Linear weights that hold one of ``patterns`` (``"n:m,..."``) stored as N:M values + indices
    and read through ``densify``, where that stores fewer bytes (see the module docstring)."""

    name: ClassVar[str] = "compact-sparse"
    patterns: str = "1:2,2:4,4:8"

    def formats(self) -> list[NMFormat]:
        return [parse_nm(p, f"{self.name} pattern") for p in self.patterns.split(",") if p.strip()]

    def apply(self, module: Module) -> PassResult:
        formats = self.formats()
        stats = Counter(not_sparse=0, not_linear_only=0, dense_bytes=0, compact_bytes=0)
        chosen: dict[str, NMFormat] = {}
        for name, reads in weight_reads(module).items():
            type = module.weights.type(name)
            if type.dtype != "f32" or type.rank != 2 or not type.is_static or LINEAR_WEIGHT not in reads:
                continue
            if reads != {LINEAR_WEIGHT}:
                stats["not_linear_only"] += 1
                continue
            fmt = best_format(module.weights.get(name), formats)
            if fmt is None:
                stats["not_sparse"] += 1
                continue
            chosen[name] = fmt
            stats["dense_bytes"] += 4 * type.numel()
            stats["compact_bytes"] += fmt.stored_bytes(*type.shape)

        store = WeightStore()
        for name in module.weights:
            entry = module.weights.entry(name)
            store.add(name, entry.type, entry.load, entry.origin)
        parts: dict[str, tuple[str, str]] = {}
        for source, fmt in chosen.items():
            n, k = module.weights.type(source).shape
            lazy = _LazyCompression(module.weights, source, fmt)
            prefix = f"{source}.{fmt.n}of{fmt.m}"
            for part, type in (("values", TensorType("f32", (n, fmt.kept(k)))),
                               ("indices", TensorType("u32", (n, fmt.index_words(k))))):
                store.add(f"{prefix}.{part}", type, lambda part=part, lazy=lazy: lazy.load(part),
                          origin=f"{self.name}: {part} of {source} ({fmt.n}:{fmt.m})")
            parts[source] = (f"{prefix}.values", f"{prefix}.indices")

        def rewrite(func: Function) -> tuple[Function, Counter]:
            counts = Counter(compacted=0)
            weights = {n.name: n for n in func.nodes if n.op == "weight" and n.attr["name"] in chosen}
            densified: dict[str, str] = {}  # weight name -> its densify in this function

            def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
                if node.op != "linear" or node.inputs[1] not in weights:
                    return None
                source = weights[node.inputs[1]].attr["name"]
                if source not in densified:
                    fmt, (n, k) = chosen[source], module.weights.type(source).shape
                    operands = [b.add("weight", type=store.type(part), name=part) for part in parts[source]]
                    densified[source] = b.add("densify", *operands, n=fmt.n, m=fmt.m, out_features=n, in_features=k)
                inputs = list(renamed(node, rename))
                inputs[1] = densified[source]
                counts["compacted"] += 1
                return b.copy_node(node, tuple(inputs))

            return rebuild(func, replace, self.name), counts

        result = map_functions(module, rewrite, weights=store)
        return PassResult(result.module, {**result.stats, **stats, "weights_compacted": len(chosen)})


__all__ = ["CompactSparse", "best_format"]
