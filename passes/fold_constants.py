"""``fold-constants``: evaluate nodes whose inputs are all weights or constants, lazily.

Requires: verified IR. Guarantees: a node is folded when
- every input is a ``weight`` or ``constant`` node, or a node folded before it (so transitively);
- its op is pure and has numpy reference semantics, and its type is static;
- it does not grow the data: ``numel(result) <= sum(numel(inputs))``. Concat, slice, transpose,
  reshape, cast and elementwise ops on same-shaped weights fold; a broadcast that would
  materialize a large tensor (``[4096, 1] + [1, 4096]``) does not.

A folded node whose inputs are all scalar ``constant`` nodes and whose result is a scalar becomes a
``constant`` node. Any other folded node becomes a ``weight`` node referencing a derived weight,
registered in a NEW WeightStore (the old one's entries plus the derived ones). Nothing is computed
while the pass runs: a derived weight's loader evaluates the op on its source weights when asked
(and returns a C-contiguous array).

Derived weight names are deterministic and readable. A ``concat`` of several weights merges
their names by the common leading and trailing dotted parts, joining the differing middles with
``+``: ``model.layers.0.self_attn.{q,k,v}_proj.weight`` give
``model.layers.0.self_attn.q_proj+k_proj+v_proj.weight``. Any other op appends ``.<op>`` to its
first source weight's name (``lm_head.weight.transpose``; ``constant.<op>`` without a weight).
A name already taken by another weight gets ``.<op>.2``, ``.<op>.3``, ... The same computation
in two functions (prefill, decode) shares one derived weight. Its store ``origin`` names the op
and all its sources.

Stats: ``folded`` nodes, ``weights_added`` derived weights. Run ``dce`` afterwards to drop the
weight nodes nothing reads any more.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..ir.graph import Builder, Function, Module, Node
from ..ir.ops import OPS
from ..ir.weights import WeightStore
from .base import Pass, PassResult, map_functions
from .rewrite import rebuild, renamed


def merge_names(names: list[str]) -> str:
    """``a.b.q.w`` + ``a.b.k.w`` -> ``a.b.q+k.w`` (common dotted prefix and suffix kept once)."""
    if len(set(names)) == 1:
        return names[0]
    parts = [name.split(".") for name in names]
    shortest = min(len(p) for p in parts)
    prefix = 0
    while prefix < shortest - 1 and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    suffix = 0
    while prefix + suffix < shortest - 1 and len({p[-1 - suffix] for p in parts}) == 1:
        suffix += 1
    middles = "+".join(".".join(p[prefix:len(p) - suffix]) for p in parts)
    return ".".join(parts[0][:prefix] + [middles] + parts[0][len(parts[0]) - suffix:])


class _DerivedWeights:
    """The new store, and the derived weights registered in it so far (one per computation)."""

    def __init__(self, old: WeightStore):
        self.store = WeightStore()
        for name in old:
            entry = old.entry(name)
            self.store.add(name, entry.type, entry.load, entry.origin)
        self.by_recipe: dict[tuple, str] = {}

    def derive(self, node: Node, args: list[str | np.ndarray]) -> str:
        """The name of the weight computing ``node`` from ``args`` (weight names or constant arrays)."""
        recipe = (node.op, node.attrs, node.type,
                  tuple(a if isinstance(a, str) else (a.dtype.str, a.item()) for a in args))
        if recipe in self.by_recipe:
            return self.by_recipe[recipe]
        sources = [a for a in args if isinstance(a, str)]
        if node.op == "concat" and len(sources) > 1:
            base = name = merge_names(sources)
        else:
            base = sources[0] if sources else "constant"
            name = f"{base}.{node.op}"
        copy = 2
        while name in self.store:
            name, copy = f"{base}.{node.op}.{copy}", copy + 1
        self.store.add(name, node.type, self._loader(node, args),
                       origin=f"fold-constants: {node.op}({', '.join(sources)})")
        self.by_recipe[recipe] = name
        return name

    def _loader(self, node: Node, args: list[str | np.ndarray]):
        store, ref, attrs = self.store, OPS[node.op].ref, node.attr

        def load() -> np.ndarray:
            return np.ascontiguousarray(ref([store.get(a) if isinstance(a, str) else a for a in args], attrs, {}))
        return load


def _numel(types) -> int:
    return sum(t.numel() for t in types)


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace computations on weights/constants by derived weights, evaluated when loaded."""

    name = "fold-constants"

    def apply(self, module: Module) -> PassResult:
        derived = _DerivedWeights(module.weights)
        result = map_functions(module, lambda func: self.rewrite_function(func, derived), weights=derived.store)
        return PassResult(result.module, {**result.stats, "weights_added": len(derived.by_recipe)})

    def rewrite_function(self, func: Function, derived: _DerivedWeights) -> tuple[Function, Counter]:
        known: dict[str, str | np.ndarray] = {}  # new value name -> weight name or scalar constant value
        stats = Counter(folded=0)

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            inputs = renamed(node, rename)
            if node.op in ("weight", "constant"):
                new = b.copy_node(node, inputs)
                known[new] = node.attr["name"] if node.op == "weight" else OPS["constant"].ref([], node.attr, {})
                return new
            if not self.foldable(node, inputs, b, known):
                return None
            stats["folded"] += 1
            args = [known[i] for i in inputs]
            if node.type.rank == 0 and not any(isinstance(a, str) for a in args):
                value = np.asarray(OPS[node.op].ref(args, node.attr, {}))
                new = b.add("constant", value=value.item(), dtype=node.type.dtype)
                known[new] = value
            else:
                weight_name = derived.derive(node, args)
                new = b.add("weight", type=node.type, name=weight_name)
                known[new] = weight_name
            return new

        return rebuild(func, replace, self.name), stats

    @staticmethod
    def foldable(node: Node, inputs: tuple[str, ...], b: Builder, known: dict) -> bool:
        opdef = OPS[node.op]
        return (bool(inputs) and all(i in known for i in inputs) and opdef.pure and opdef.ref is not None
                and node.type.is_static and node.type.numel() <= _numel(b.types[i] for i in inputs))
