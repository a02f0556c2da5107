"""Replace a linear by two: ``linear(x, W[N, K])`` becomes ``linear(linear(x, B[r, K]), A[N, r])``
(a bias, if any, moves to the second), the rewrite every low-rank pass shares.

``factorize_linears(module, pass_name, method, ranks, produce, choose)``: each linear reading a
stored f32 weight named in ``ranks`` (and for which ``choose(linear, weight_node)``, if given, holds)
is replaced; the weight gets, in a NEW WeightStore (the old entries kept),
the derived weights ``<weight>.<method>-r<rank>.b`` ``[r, K]`` and ``.a`` ``[N, r]``, whose loaders
share one ``produce(weight_name, rank) -> (A, B)`` call (run when the first is loaded, dropped once
both were handed out). The new ``weight`` and ``linear`` nodes carry ``created_by`` the pass and the
``source`` of the linear they replace. The same weight read in several functions (prefill, decode)
gets one pair of derived weights. The original weight node stays; ``dce`` drops it when nothing else
reads it.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from ...ir.graph import Builder, Function, Module, Node
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from ..base import PassResult, map_functions
from ..quant.rewrite import linear_weights
from ..rewrite import rebuild, renamed

Produce = Callable[[str, int], "tuple[np.ndarray, np.ndarray]"]
PARTS = ("a", "b")


def factor_names(source: str, method: str, rank: int) -> dict[str, str]:
    """part (``a``: ``[N, r]``, read second; ``b``: ``[r, K]``, read first) -> derived weight name."""
    return {part: f"{source}.{method}-r{rank}.{part}" for part in PARTS}


class _SharedFactors:
    """One weight's factors, computed when a part is first loaded, kept until both were loaded once."""

    def __init__(self, produce: Produce, source: str, rank: int):
        self.produce, self.source, self.rank = produce, source, rank
        self.cached: dict[str, np.ndarray] | None = None
        self.pending: set[str] = set()

    def load(self, part: str) -> np.ndarray:
        if self.cached is None:
            a, b = self.produce(self.source, self.rank)
            self.cached, self.pending = {"a": np.asarray(a, np.float32), "b": np.asarray(b, np.float32)}, set(PARTS)
        array = self.cached[part]
        self.pending.discard(part)
        if not self.pending:
            self.cached = None
        return array


def factorize_linears(module: Module, pass_name: str, method: str, ranks: dict[str, int], produce: Produce,
                      choose: Callable[[Node, Node], bool] = lambda linear, weight: True) -> PassResult:
    """See the module docstring. Stats: ``factorized`` linears, ``weights_factorized``."""
    store = WeightStore()
    for name in module.weights:
        entry = module.weights.entry(name)
        store.add(name, entry.type, entry.load, entry.origin)
    derived: dict[str, dict[str, str]] = {}

    def derive(weight: Node) -> dict[str, str]:
        source = weight.attr["name"]
        if source not in derived:
            (n, k), rank = weight.type.shape, ranks[source]
            names, shared = factor_names(source, method, rank), _SharedFactors(produce, source, rank)
            shapes = {"a": (n, rank), "b": (rank, k)}
            for part, name in names.items():
                store.add(name, TensorType("f32", shapes[part]), lambda part=part: shared.load(part),
                          origin=f"{pass_name}: factor {part.upper()} of {source} (rank {rank})")
            derived[source] = names
        return derived[source]

    def rewrite(func: Function) -> tuple[Function, Counter]:
        stats = Counter(factorized=0)
        weights = linear_weights(func)

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            weight = weights.get(node.name)
            if weight is None or weight.attr["name"] not in ranks or not choose(node, weight):
                return None
            names = derive(weight)
            x, _, *bias = renamed(node, rename)
            first = b.add("linear", x, b.add("weight", type=store.type(names["b"]), name=names["b"]))
            stats["factorized"] += 1
            return b.add("linear", first, b.add("weight", type=store.type(names["a"]), name=names["a"]), *bias)

        return rebuild(func, replace, pass_name), stats

    result = map_functions(module, rewrite, weights=store)
    return PassResult(result.module, {**result.stats, "weights_factorized": len(derived)})
