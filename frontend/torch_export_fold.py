"""Constant folding for torch.export graphs: values that do not depend on the inputs are computed once.

A traced model often computes tensors from nothing but buffers and sizes: Hugging Face builds its
causal mask and its rotary cos/sin tables that way, with ops (``arange``, ``cumsum``, ``index``)
that have no IR counterpart. A node is *foldable* when it reads no user input and no parameter
(parameters stay weights, so no weight is duplicated) and its value has a static shape. The
frontend runs such nodes with torch at trace time and uses their results as constants.
"""

from __future__ import annotations

import torch
import torch.fx


def is_static(value) -> bool:
    """True when ``value`` (a node's ``meta["val"]``) holds no symbolic size."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    if isinstance(value, torch.Tensor):
        return all(isinstance(d, int) for d in value.shape)
    if isinstance(value, (tuple, list)):
        return all(is_static(v) for v in value)
    return True


def fold_constants(graph: torch.fx.Graph, sources: dict[str, torch.Tensor]) -> dict[str, object]:
    """Concrete values of the foldable nodes, by fx node name.

    ``sources``: the values of the placeholders that may be folded through (buffers and lifted
    tensor constants). Foldable nodes are evaluated eagerly, in graph order.
    """
    values: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in sources:
                values[node.name] = sources[node.name]
        elif (node.op == "call_function" and is_static(node.meta.get("val"))
              and all(arg.name in values for arg in node.all_input_nodes)):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: values[arg.name])
            with torch.no_grad():
                values[node.name] = node.target(*args, **kwargs)
    return values
