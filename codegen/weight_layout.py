"""Which weights a target stores in its kernels' packed layout instead of the IR's ``[N, columns]``.

A weight read only as the weight of ``linear`` nodes (and possibly as an ``embedding`` table,
which can gather rows from the packed layout too) is stored packed, once: so a tied embedding and
LM head share one copy. So is a weight read only as an operand of ``dequantize`` nodes that the
target's fused quantized-linear kernel absorbs (codegen/quant_fusion.py): its packed codes, scales
and zeros, each ``[N, columns]``, get the same layout. A weight read any other way stays as the
IR says.
"""

from __future__ import annotations

from ..ir.graph import Module
from .quant_fusion import SupportsQuantLinear, fused_dequantizes

FUSED_DEQUANTIZE = "fused-dequantize"  # the op name a use by an absorbed dequantize is recorded under
ANCHOR_USES = {("linear", 1)} | {(FUSED_DEQUANTIZE, i) for i in range(3)}  # uses read by a linear kernel
PACKABLE_USES = ANCHOR_USES | {("embedding", 1)}


def weight_uses(module: Module, supports: SupportsQuantLinear | None = None) -> dict[str, set[tuple[str, int]]]:
    """weight name -> {(op, operand index)} over every function; an operand of a ``dequantize``
    that a fused kernel absorbs (see ``supports``) is recorded as a ``fused-dequantize`` use."""
    uses: dict[str, set[tuple[str, int]]] = {}
    for func in module.functions.values():
        weights = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
        fused = fused_dequantizes(func, supports)
        for node in func.nodes:
            op = FUSED_DEQUANTIZE if node.name in fused else node.op
            for index, value in enumerate(node.inputs):
                if value in weights:
                    uses.setdefault(weights[value], set()).add((op, index))
        for _, value in func.outputs:
            if value in weights:
                uses.setdefault(weights[value], set()).add(("output", 0))
    return uses


def packed_weights(module: Module, supports: SupportsQuantLinear | None = None) -> set[str]:
    """Weights to store packed: read by a linear kernel (as a float weight, or as a part of a
    quantized one that ``supports`` fuses), and otherwise only as an embedding table."""
    return {name for name, uses in weight_uses(module, supports).items()
            if uses & ANCHOR_USES and uses <= PACKABLE_USES}
