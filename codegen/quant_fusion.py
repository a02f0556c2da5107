"""Which ``dequantize`` nodes are never materialized, and the layout-free part of their lowering.

A ``dequantize`` (no function output) whose every use is either the weight operand of a ``linear``
that the target's fused quantized-linear kernel computes for its scheme and shape, or the table
of an ``embedding``, is absorbed: each of those linears reads the packed codes, scales and zeros
directly, and each embedding gathers the rows of codes, scales and zeros its ids pick and
dequantizes only those (codegen/lower_ops.py). So a tied embedding and LM head quantized with one
scheme read one set of parts and never build the f32 table. Any other use keeps the generic
lowering (the f32 weight is computed, then used; an embedding still gathers from the parts).
Codegen (which lowering runs) and the weight layout (which parts are stored in the kernel's
layout) both ask this one function.
"""

from __future__ import annotations

from typing import Callable

from ..ir.graph import Function, Node
from ..ir.quant_schemes import Scheme, get_scheme

SupportsQuantLinear = Callable[[Scheme, int, int], bool]  # (scheme, out_features, in_features) -> fused?

GATHERED_USE = ("embedding", 1)  # a dequantize read as an embedding table: rows gathered, never whole
KERNEL_USE = ("linear", 1)  # a dequantize read as a linear weight: absorbed when the kernel supports it


def dequantize_scheme(node: Node) -> tuple[Scheme, int, int]:
    """(scheme, out_features, in_features) of a ``dequantize`` node."""
    return get_scheme(node.attr["scheme"]), node.attr["out_features"], node.attr["in_features"]


def dequantize_uses(func: Function) -> dict[str, set[tuple[str, int]]]:
    """``dequantize`` node name -> its uses, {(op, operand index)}; a function output is ("output", 0)."""
    dequantizes = {node.name for node in func.nodes if node.op == "dequantize"}
    uses: dict[str, set[tuple[str, int]]] = {name: set() for name in dequantizes}
    for node in func.nodes:
        for index, value in enumerate(node.inputs):
            if value in dequantizes:
                uses[value].add((node.op, index))
    for _, value in func.outputs:
        if value in dequantizes:
            uses[value].add(("output", 0))
    return uses


def fused_dequantizes(func: Function, supports: SupportsQuantLinear | None) -> set[str]:
    """Names of the ``dequantize`` nodes of ``func`` never materialized: read only by linears that
    the target's fused kernel absorbs (``supports``; None: the target has no such kernel) and by
    embeddings (which gather rows of the parts)."""
    nodes = func.node_map()
    absorbed = set()
    for name, uses in dequantize_uses(func).items():
        allowed = {GATHERED_USE} | ({KERNEL_USE} if supports is not None else set())
        if uses and uses <= allowed and (KERNEL_USE not in uses or supports(*dequantize_scheme(nodes[name]))):
            absorbed.add(name)
    return absorbed
