"""Replace the weight of chosen linears by a derived f32 weight of the same shape (a pruned copy):
the rewrite every pruning pass shares, the plain-float analogue of quantization's
``quantize_linears``.

``replace_linear_weights(module, pass_name, choose, produce)``: for each linear reading a stored f32
``[N, K]`` weight, ``choose(linear, weight_node)`` returns a tag (``"s0.5"``) or None (keep it). The
rewrite registers, per (source weight, tag), the derived weight ``<weight>.pruned-<tag>`` in a NEW
WeightStore (the old entries kept), whose loader is ``produce(weight_name, tag)`` (run when the
weight is loaded), and makes the linear read it through a new ``weight`` node (``created_by`` the
pass, ``source`` the linear's). The same weight read in several functions (prefill, decode) gets
one derived weight. The original weight node stays; ``dce`` drops it when nothing else reads it.
The stats load each derived weight once, to count its zeros.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from ...ir.graph import Builder, Function, Module, Node
from ...ir.weights import WeightStore
from ..base import PassResult, map_functions
from ..quant.rewrite import linear_weights
from ..rewrite import rebuild, renamed

Choose = Callable[[Node, Node], "str | None"]
Produce = Callable[[str, str], np.ndarray]


def derived_name(source: str, tag: str) -> str:
    return f"{source}.pruned-{tag}"


def replace_linear_weights(module: Module, pass_name: str, choose: Choose, produce: Produce) -> PassResult:
    """See the module docstring. Stats: ``pruned`` linears, ``weights_pruned`` derived weights, and
    over those (each loaded once here to count): ``params``, ``zeros`` and ``sparsity`` (their ratio,
    the achieved sparsity, including weights that were zero before pruning)."""
    store = WeightStore()
    for name in module.weights:
        entry = module.weights.entry(name)
        store.add(name, entry.type, entry.load, entry.origin)
    derived: dict[tuple[str, str], str] = {}

    def derive(weight: Node, tag: str) -> str:
        source = weight.attr["name"]
        if (source, tag) not in derived:
            name = derived_name(source, tag)
            store.add(name, weight.type, lambda: np.asarray(produce(source, tag), np.float32),
                      origin=f"{pass_name}: {source} pruned ({tag})")
            derived[source, tag] = name
        return derived[source, tag]

    def rewrite(func: Function) -> tuple[Function, Counter]:
        stats = Counter(pruned=0)
        weights = linear_weights(func)

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            weight = weights.get(node.name)
            tag = choose(node, weight) if weight is not None else None
            if tag is None:
                return None
            inputs = list(renamed(node, rename))
            inputs[1] = b.add("weight", type=weight.type, name=derive(weight, tag))
            stats["pruned"] += 1
            return b.copy_node(node, tuple(inputs))

        return rebuild(func, replace, pass_name), stats

    result = map_functions(module, rewrite, weights=store)
    params = zeros = 0
    for name in derived.values():
        array = store.get(name)
        params, zeros = params + array.size, zeros + array.size - int(np.count_nonzero(array))
    return PassResult(result.module, {**result.stats, "weights_pruned": len(derived), "params": params,
                                      "zeros": zeros, "sparsity": round(zeros / params, 6) if params else 0.0})
