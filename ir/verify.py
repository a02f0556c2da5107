"""The verifier: what every pass may assume and must leave behind.

- SSA: every value is defined once, before its uses; outputs name defined values;
- every op is registered, has the right number of inputs and the attributes it needs;
- every node's type equals the type its op infers from its inputs;
- every weight node names a weight in the store, with the same type.
"""

from __future__ import annotations

from .graph import Function, Module
from .ops import OPS, OpError, infer_type


class VerifyError(ValueError):
    pass


def verify_function(func: Function, weights=None) -> list[str]:
    """Problems found in ``func`` (empty when it is well formed)."""
    problems: list[str] = []
    types = {}
    for p in func.params:
        if p.name in types:
            problems.append(f"@{func.name}: param %{p.name} defined twice")
        types[p.name] = p.type
    for node in func.nodes:
        where = f"@{func.name} %{node.name} = {node.op}" + "".join(
            f" ({label} {value})" for label, value in (("from", node.source), ("by", node.created_by)) if value)
        if node.name in types:
            problems.append(f"{where}: %{node.name} defined twice")
        undefined = [i for i in node.inputs if i not in types]
        if undefined:
            problems.append(f"{where}: uses undefined " + ", ".join(f"%{u}" for u in undefined))
        elif node.op not in OPS:
            problems.append(f"{where}: unknown op")
        elif node.op == "weight":
            name = node.attr.get("name")
            if weights is not None and name not in weights:
                problems.append(f"{where}: weight {name!r} is not in the weight store")
            elif weights is not None and weights.type(name) != node.type:
                problems.append(f"{where}: weight {name!r} is {weights.type(name)}, node says {node.type}")
        else:
            try:
                inferred = infer_type(node.op, [types[i] for i in node.inputs], node.attr)
                if inferred != node.type:
                    problems.append(f"{where}: type {node.type} but its op gives {inferred}")
            except OpError as err:
                problems.append(f"{where}: {err}")
        types[node.name] = node.type
    for name, value in func.outputs:
        if value not in types:
            problems.append(f"@{func.name}: output {name} = %{value} is not defined")
    return problems


def verify_module(module: Module) -> None:
    """Raise VerifyError listing every problem in ``module``."""
    problems = [p for f in module.functions.values() for p in verify_function(f, module.weights)]
    if problems:
        raise VerifyError(f"IR verification failed ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
