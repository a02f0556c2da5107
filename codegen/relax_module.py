"""IR module -> TVM Relax IRModule: one Relax function per IR function, weights as trailing params.

Calling convention (what the runtime relies on): every function takes its IR params in order,
then every weight of the module in ``weight_order(module)``; it returns a tuple of its outputs in
order. Symbolic dims become shared ``int64`` TIR vars per function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import tvm
from tvm import relax

from ..errors import LLMOptError
from ..ir.graph import Function, Module
from ..ir.types import TVM_DTYPES, TensorType
from .lower_ops import LOWERINGS, AbsorbedWeight, LoweringContext, unsupported
from .lower_sparse import fused_densifies
from .quant_fusion import fused_dequantizes


def default_emit_linear(bb: relax.BlockBuilder, x, w, bias):
    """Plain Relax linear: correct everywhere, scheduled by nothing (targets supply better kernels)."""
    return relax.op.linear(x, w, bias)


def weight_order(module: Module) -> list[str]:
    return module.weight_names()


def weight_param_type(module: Module, name: str, layout) -> TensorType:
    """The type a weight has as a library parameter: packed when ``layout`` packs it."""
    type = module.weights.type(name)
    return type.with_shape(layout.packed_shape(*type.shape)) if layout is not None else type


def _tensor_type(ctx: LoweringContext, type: TensorType) -> relax.TensorType:
    return relax.TensorType([ctx.dim(d) for d in type.shape], TVM_DTYPES[type.dtype])


def _lower_function(bb: relax.BlockBuilder, func: Function, weights: list[tuple[str, TensorType]],
                    kernels: Kernels, packed: set[str]) -> None:
    packed_values = {n.name for n in func.nodes if n.op == "weight" and n.attr["name"] in packed}
    ctx = LoweringContext(bb, {}, kernels.emit_linear, kernels.emit_attention, func.types(), packed_values,
                          kernels.emit_quant_linear,
                          fused_dequantizes(func, kernels.fuses_dequantize) | fused_densifies(func))
    inputs = [relax.Var(p.name, _tensor_type(ctx, p.type)) for p in func.params]
    # a C identifier: device code (CUDA C) names kernel parameters after the vars ("q+k+v" is no name)
    weight_vars = {name: relax.Var(re.sub(r"^(?=\d)|[^0-9A-Za-z_]", "_", name), _tensor_type(ctx, t))
                   for name, t in weights}
    with bb.function(func.name, inputs + list(weight_vars.values()), attrs={"num_input": len(inputs)}):
        with bb.dataflow():
            values = {p.name: var for p, var in zip(func.params, inputs)}
            for node in func.nodes:
                if node.op == "weight":
                    values[node.name] = weight_vars[node.attr["name"]]
                    continue
                lower = LOWERINGS.get(node.op)
                if lower is None:
                    raise LLMOptError(f"codegen: {unsupported(node)}.",
                                      "Add a lowering in codegen/lower_ops.py, or a pass that rewrites the op.")
                expr = lower(ctx, node, [values[i] for i in node.inputs])
                values[node.name] = expr if isinstance(expr, (relax.Var, AbsorbedWeight)) else bb.emit(expr)
                values[node.name] = _as_ir_dtype(bb, values[node.name], node.type.dtype)
            result = bb.emit_output(relax.Tuple([values[v] for _, v in func.outputs]))
        bb.emit_func_output(result)


def _as_ir_dtype(bb: relax.BlockBuilder, value, dtype: str):
    """``value`` in the node's IR dtype: lowerings of f16 nodes may compute in f32 (the IR's f16
    semantics, see ir/interp.py) and leave the final rounding to this cast."""
    if isinstance(value, AbsorbedWeight) or value.ty.dtype == TVM_DTYPES[dtype]:
        return value
    return bb.emit(relax.op.astype(value, TVM_DTYPES[dtype]))


@dataclass(frozen=True)
class Kernels:
    """The target's kernels for the hot ops (None: generic Relax ops)."""

    emit_linear: Callable = default_emit_linear
    emit_attention: Callable | None = None
    emit_quant_linear: Callable | None = None  # see TargetSpec.emit_quant_linear
    fuses_dequantize: Callable | None = None  # (scheme, out_features, in_features) -> bool; None: never


def to_relax(module: Module, kernels: Kernels = Kernels(), layout=None,
             packed: set[str] = frozenset()) -> tvm.IRModule:
    """The Relax IRModule of ``module`` (see the calling convention above).

    Weights in ``packed`` are parameters in ``layout`` (see codegen/weight_layout.py); the linear
    kernels and the embedding lowering read them in that layout. A ``dequantize`` read only by
    linears (and embeddings, which gather its rows) becomes part of their ``kernels.emit_quant_linear``
    call when ``kernels.fuses_dequantize`` accepts it (codegen/quant_fusion.py); pass the same
    predicate to ``packed_weights``.
    """
    weights = [(name, weight_param_type(module, name, layout if name in packed else None))
               for name in weight_order(module)]
    bb = relax.BlockBuilder()
    for func in module.functions.values():
        _lower_function(bb, func, weights, kernels, packed)
    return bb.get()
