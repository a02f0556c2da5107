"""How many parameters a module's weights stand for, whatever their storage.

A quantized weight counts as the values it dequantizes to, not as its packed codes, scales or zeros;
a factorized (low-rank) or structurally pruned linear counts as its smaller shapes; unstructured
sparsity does not change the count (the zeros are still stored).
"""

from __future__ import annotations

import math

from .graph import Module

_STORAGE = {  # op -> positions of the inputs that store one weight (codes first), its logical [N, K]
    "dequantize": ((0, 1, 2), lambda node, types: node.type.shape),
    "densify": ((0, 1), lambda node, types: node.type.shape),  # N:M-sparse values and indices
    "linear_w8a8": ((1, 2), lambda node, types: (node.type.shape[-1], types[node.inputs[0]].shape[-1])),
    "linear_w4a8": ((1, 2), lambda node, types: (node.type.shape[-1], types[node.inputs[0]].shape[-1])),
}


def logical_parameters(module: Module) -> int:
    """The parameters of every weight any entry point reads, each weight counted once."""
    counted: set[str] = set()  # weight names
    total = 0
    for func in module.functions.values():
        types, weight_of = func.types(), {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
        for node in func.nodes:
            if node.op not in _STORAGE:
                continue
            positions, logical_shape = _STORAGE[node.op]
            storage = [weight_of.get(node.inputs[i]) for i in positions if i < len(node.inputs)]
            if storage[0] is not None and storage[0] not in counted:
                total += math.prod(logical_shape(node, types))
            counted.update(name for name in storage if name is not None)
        for node in func.nodes:
            if node.op == "weight" and node.attr["name"] not in counted:
                counted.add(node.attr["name"])
                total += math.prod(node.type.shape)
    return total
