"""Which ``dequantize`` nodes a target's fused quantized-linear kernel absorbs.

A ``dequantize`` whose every use is the weight operand of a ``linear`` (and which is no function
output) is never materialized when the target has a fused kernel for its scheme and shape: each
of those linears reads the packed codes, scales and zeros directly. Any other use keeps the
generic lowering (the f32 weight is computed, then used). Codegen (which lowering runs) and the
weight layout (which parts are stored in the kernel's layout) both ask this one function.
"""

from __future__ import annotations

from typing import Callable

from ..ir.graph import Function, Node
from ..ir.quant_schemes import Scheme, get_scheme

SupportsQuantLinear = Callable[[Scheme, int, int], bool]  # (scheme, out_features, in_features) -> fused?


def dequantize_scheme(node: Node) -> tuple[Scheme, int, int]:
    """(scheme, out_features, in_features) of a ``dequantize`` node."""
    return get_scheme(node.attr["scheme"]), node.attr["out_features"], node.attr["in_features"]


def fused_dequantizes(func: Function, supports: SupportsQuantLinear | None) -> set[str]:
    """Names of the ``dequantize`` nodes of ``func`` that the linears reading them absorb
    (none when the target has no fused kernel: ``supports`` is None)."""
    if supports is None:
        return set()
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in func.nodes:
        for index, value in enumerate(node.inputs):
            uses.setdefault(value, set()).add((node.op, index))
    outputs = {value for _, value in func.outputs}
    return {node.name for node in func.nodes
            if node.op == "dequantize" and node.name not in outputs
            and uses.get(node.name) == {("linear", 1)} and supports(*dequantize_scheme(node))}
