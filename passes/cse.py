"""``cse``: common subexpression elimination.

Requires: verified IR. Guarantees: no two pure nodes compute the same (op, inputs, attrs, type);
weight nodes naming the same weight count as the same. Of each set of equal nodes the first is
kept, with its provenance; later uses read it. Does not remove nodes nothing reads (run ``dce``).
Stats: ``merged`` nodes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..ir.graph import Builder, Function, Module, Node
from ..ir.ops import OPS
from .base import Pass, PassResult, map_functions
from .rewrite import rebuild, renamed


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes with identical (op, inputs, attrs, type), keeping the first one."""

    name = "cse"

    def apply(self, module: Module) -> PassResult:
        return map_functions(module, self.rewrite_function)

    def rewrite_function(self, func: Function) -> tuple[Function, Counter]:
        first: dict[tuple, str] = {}  # structure with new input names -> the first node's new name
        stats = Counter(merged=0)

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            if not OPS[node.op].pure:
                return None
            key = (node.op, renamed(node, rename), node.attrs, node.type)
            if key in first:
                stats["merged"] += 1
                return first[key]
            first[key] = b.copy_node(node, key[1])
            return first[key]

        return rebuild(func, replace, self.name), stats
