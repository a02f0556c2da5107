"""Which weights a target stores in its kernels' packed layout instead of the IR's ``[N, K]``.

A weight read only as the weight of ``linear`` nodes (and possibly as an ``embedding`` table,
which can gather rows from the packed layout too) is stored packed, once: so a tied embedding and
LM head share one copy. A weight read any other way stays as the IR says.
"""

from __future__ import annotations

from ..ir.graph import Module

PACKABLE_USES = {("linear", 1), ("embedding", 1)}


def weight_uses(module: Module) -> dict[str, set[tuple[str, int]]]:
    """weight name -> {(op, operand index)} over every function."""
    uses: dict[str, set[tuple[str, int]]] = {}
    for func in module.functions.values():
        weights = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
        for node in func.nodes:
            for index, value in enumerate(node.inputs):
                if value in weights:
                    uses.setdefault(weights[value], set()).add((node.op, index))
        for _, value in func.outputs:
            if value in weights:
                uses.setdefault(weights[value], set()).add(("output", 0))
    return uses


def packed_weights(module: Module) -> set[str]:
    """Weights to store packed: used by a linear, and otherwise only as an embedding table."""
    return {name for name, uses in weight_uses(module).items()
            if ("linear", 1) in uses and uses <= PACKABLE_USES}
