"""Linears for GPU targets, as one TE compute each, for TVM's dlight GPU rules to schedule.

``y[m, n] = sum_k x[m, k] * w[n, k]`` reads the weight as stored (``[N, K]``, the IR's layout):
Relax's ``linear`` would transpose every weight into a separate buffer on every call first (a
separate transpose also keeps dlight from seeing one NT matmul). A quantized linear is the same
reduction with the dequantize inlined (quant_linear_te.py), so the weight is never materialized.
dlight's GEMV rule takes decode (M = 1), its Matmul rule prefill; ``x`` is reshaped to 2-D.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te

from ...ir.quant_schemes import Scheme
from .quant_linear_te import quant_linear_te


def linear_te(x: te.Tensor, w: te.Tensor, *bias: te.Tensor) -> te.Tensor:
    """``x [M, K] @ w[N, K]^T (+ bias[N])``, summed in f32 whatever the operands' dtype (f16 operands:
    the tensor-core form dlight's Matmul rule recognizes, f16 inputs with f32 accumulators)."""
    k = te.reduce_axis((0, x.shape[1]), name="k")
    y = te.compute((x.shape[0], w.shape[0]), lambda m, n: te.sum(
        _f32(x[m, k]) * _f32(w[n, k]), axis=k), name="linear")
    return _epilogue(y, x.dtype, bias[0] if bias else None, "linear")


def _f32(value):
    return value if value.dtype == "float32" else value.astype("float32")


def _epilogue(y: te.Tensor, dtype: str, bias: te.Tensor | None, name: str) -> te.Tensor:
    """``y (+ bias)`` in ``dtype`` (one elementwise stage, which dlight fuses into the matmul)."""
    if bias is None and dtype == "float32":
        return y
    return te.compute(y.shape, lambda m, n: (y[m, n] + (_f32(bias[n]) if bias is not None else 0.0)).astype(dtype),
                      name=f"{name}_out")


def _emit_2d(bb: relax.BlockBuilder, x: relax.Expr, in_features: int, out_features: int, emit) -> relax.Expr:
    """``emit(x2d)`` on ``x [..., K]`` seen as ``[rows, K]``, reshaped back to ``[..., N]``."""
    shape = list(x.ty.shape.values)
    if len(shape) == 2:
        return emit(x)
    y = emit(bb.emit(relax.op.reshape(x, [-1, in_features])))
    return bb.emit(relax.op.reshape(y, shape[:-1] + [out_features]))


def emit_linear(bb: relax.BlockBuilder, x: relax.Expr, w: relax.Expr, bias: relax.Expr | None,
                out_features: int | None = None) -> relax.Expr:
    """``x @ w^T (+ bias)`` for ``w`` f32 ``[N, K]`` in the IR's layout."""
    n, k = (int(d) for d in w.ty.shape.values)
    operands = [w] + ([bias] if bias is not None else [])
    return _emit_2d(bb, x, k, n, lambda x2d: bb.emit_te(linear_te, x2d, *operands, primfunc_name_hint="linear"))


def emit_quant_linear(bb: relax.BlockBuilder, x: relax.Expr, packed: relax.Expr, scales: relax.Expr,
                      zeros: relax.Expr | None, bias: relax.Expr | None, scheme: Scheme, out_features: int,
                      in_features: int) -> relax.Expr:
    """``x @ dequantize(packed, scales[, zeros])^T (+ bias)``, parts in the IR's layout."""
    codebook = relax.const(np.asarray(scheme.codebook, np.float32)) if scheme.codebook is not None else None
    present = (zeros is not None, codebook is not None, bias is not None)
    operands = [part for part in (zeros, codebook, bias) if part is not None]

    def compute(x, packed, scales, *rest):  # emit_te passes TVM values only: rest is [zeros][codebook][bias]
        rest = list(rest)
        parts = [rest.pop(0) if there else None for there in present]
        return quant_linear_te(x, packed, scales, *parts, scheme=scheme, in_features=in_features)

    return _emit_2d(bb, x, in_features, out_features, lambda x2d: bb.emit_te(
        compute, x2d, packed, scales, *operands, primfunc_name_hint="quant_linear"))


def supports_quant_linear(scheme: Scheme, out_features: int, in_features: int) -> bool:
    """Integer schemes, any shape. Not codebook schemes (NF4, FP8): dlight's GEMV analysis (TVM 0.27)
    fails an assertion on the table lookup ``codebook[code]``, so they take the generic path."""
    return scheme.codebook is None and scheme.supports(in_features)
