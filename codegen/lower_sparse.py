"""How ``densify`` (N:M-sparse values + indices -> the dense weight, ir/ops.py) becomes Relax.

A ``densify`` whose every use is the weight operand of a ``linear`` is absorbed when the target's
sparse kernel covers it (:func:`fused_densifies`: LLVM targets, kernels/cpu_sparse_linear.supports):
it lowers to a :class:`FusedDensify` (no value), and each of those linears runs the sparse GEMV at
M == 1 and the sparse GEMM at any other M (values and indices read as stored, no dense weight;
formats the GEMM does not cover densify into a temporary for cpu_linear's GEMM). Any other ``densify`` (GPU
targets, shapes or formats the kernel does not cover, other uses) is materialized by the generic TE
compute (kernels/sparse_te.py) and read as a dense weight. Registered into ``LOWERINGS`` by the
import at the end of lower_ops.py. Values and indices stay in the IR's ``[N, columns]`` layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm

from ..ir.graph import Function, Node
from ..ir.sparse_format import NMFormat
from .kernels.cpu_sparse_linear import emit_sparse_linear, supports
from .kernels.sparse_te import densify_te
from .lower_ops import AbsorbedWeight, lowers

KERNEL_USE = ("linear", 1)


def densify_format(node: Node) -> tuple[NMFormat, int, int]:
    """(format, out_features, in_features) of a ``densify`` node."""
    return NMFormat(node.attr["n"], node.attr["m"]), node.attr["out_features"], node.attr["in_features"]


def fused_densifies(func: Function, target: tvm.target.Target | None = None) -> set[str]:
    """Names of the ``densify`` nodes of ``func`` never materialized on ``target`` (default: the
    current one): read only as linear weights, in a format and shape the sparse kernel covers."""
    target = target or tvm.target.Target.current(allow_none=True)
    nodes = func.node_map()
    uses: dict[str, set] = {node.name: set() for node in func.nodes if node.op == "densify"}
    for node in func.nodes:
        for index, value in enumerate(node.inputs):
            if value in uses:
                uses[value].add((node.op, index))
    for _, value in func.outputs:
        if value in uses:
            uses[value].add(("output", 0))
    return {name for name, found in uses.items()
            if found == {KERNEL_USE} and supports(*densify_format(nodes[name]), target)}


@dataclass(frozen=True)
class FusedDensify(AbsorbedWeight):
    """An absorbed ``densify``: its lowered values and indices, for the linears reading it."""

    node: Node
    operands: tuple  # lowered values, indices

    def emit_linear(self, ctx, x, bias):
        fmt, out_features, in_features = densify_format(self.node)
        values, indices = self.operands
        return emit_sparse_linear(ctx.bb, x, values, indices, bias, fmt=fmt, out_features=out_features,
                                  in_features=in_features, target=tvm.target.Target.current())


@lowers("densify")
def _densify(ctx, node, args):
    if node.name in ctx.fused:
        return FusedDensify(node, tuple(args))
    fmt, _, in_features = densify_format(node)
    # emit_te passes only TVM values on: the format goes in through partial
    compute = functools.partial(densify_te, fmt=fmt, in_features=in_features)
    return ctx.bb.emit_te(compute, *args, primfunc_name_hint="densify")
