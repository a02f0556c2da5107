"""``dce``: dead code elimination.

Requires: verified IR. Guarantees: every node left is read, directly or through other nodes, by a
function output; params stay (they are the function's signature); the outputs are unchanged.
Nodes are renumbered in order (canonical text). Stats: ``removed`` nodes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..ir.graph import Function, Module
from .base import Pass, PassResult, map_functions
from .rewrite import DROP, rebuild


def live_values(func: Function) -> set[str]:
    """Names of the values some output reads, transitively."""
    live = {value for _, value in func.outputs}
    for node in reversed(func.nodes):
        if node.name in live:
            live.update(node.inputs)
    return live


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose values no output (transitively) reads."""

    name = "dce"

    def apply(self, module: Module) -> PassResult:
        return map_functions(module, self.rewrite_function)

    def rewrite_function(self, func: Function) -> tuple[Function, Counter]:
        live = live_values(func)
        new = rebuild(func, lambda node, b, rename: None if node.name in live else DROP, self.name)
        return new, Counter(removed=len(func.nodes) - len(new.nodes))
