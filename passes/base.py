"""What a pass is: a frozen dataclass with a kebab-case ``name`` whose fields are its options.

A pass maps a module to a NEW module: it never edits the input's functions or weight store
(nodes are immutable; functions are rebuilt with ``ir.graph.Builder``, see ``passes/rewrite.py``).
Nodes a pass creates carry ``created_by=<pass name>`` and the ``source`` of the node they replace.
Every pass may assume verified IR and must leave verified IR (``ir.verify.verify_module``).

Passes implement ``apply``, which also returns counts of what they did (``{"merged": 3}``), so
tests and the PassManager can see a rewrite that silently stopped firing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from ..ir.graph import Function, Module


@dataclass(frozen=True)
class PassResult:
    module: Module
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base of all passes. Subclasses set ``name`` and implement ``apply``."""

    name: ClassVar[str] = ""

    def apply(self, module: Module) -> PassResult:
        raise NotImplementedError(f"pass {type(self).__name__} does not implement apply()")

    def run(self, module: Module) -> Module:
        return self.apply(module).module


FunctionRewrite = Callable[[Function], tuple[Function, Counter]]


def map_functions(module: Module, rewrite: FunctionRewrite, weights=None) -> PassResult:
    """Apply ``rewrite`` to every function; stats are summed over functions.

    ``weights`` replaces the module's weight store (passes that derive new weights).
    """
    functions, stats = {}, Counter()
    for name, func in module.functions.items():
        functions[name], counts = rewrite(func)
        stats.update(counts)
    new = Module(functions, module.weights if weights is None else weights, dict(module.meta))
    return PassResult(new, dict(stats))
