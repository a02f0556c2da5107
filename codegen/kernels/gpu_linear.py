"""Linears for GPU targets, as TE computes for TVM's dlight GPU rules to schedule.

``y[m, n] = sum_k x[m, k] * w[n, k]`` reads the weight as stored (``[N, K]``, the IR's layout):
Relax's ``linear`` would transpose every weight into a separate buffer on every call first (a
separate transpose also keeps dlight from seeing one NT matmul). ``x`` is reshaped to 2-D.

A quantized linear has two forms, chosen by the static shape of ``x``:

- one row (decode, M = 1): the reduction with the dequantize inlined (quant_linear_te.py), which
  dlight's GEMV rule schedules; the weight is never materialized, each code is read once.
- more rows, or a symbolic number (prefill, logits: M = ``seq``): the weight's dequantize as its
  own elementwise kernel, giving the dense ``[N, K]`` weight in ``x``'s dtype (f16 in fp16
  builds, rounded as the IR's ``dequantize`` rounds it), then the plain NT matmul
  (:func:`linear_te`), which dlight's Matmul rule tiles through shared memory (tensor cores for f16
  operands). dlight's Matmul rule (TVM 0.27) does not take the fused form, which falls to the
  Fallback schedule: one thread per output, a serial loop over K that decodes every code it reads.
  Dequantizing costs one pass over the weight per call, small next to the matmul's M passes.

:func:`emit_fused_quant_linear` is the fused form for any number of rows, for targets without the
Matmul rule (webgpu), where a dense weight would buy prefill no better schedule.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from ...ir.quant_schemes import Scheme
from .quant_linear_te import dequantized_weight, quant_linear_te


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
    """``x @ dequantize(packed, scales[, zeros])^T (+ bias)``, parts in the IR's layout: the fused
    GEMV when ``x`` has statically one row, else dequantize then NT matmul (see the module doc)."""
    if not is_one_row(x):
        w = emit_dequantized_weight(bb, packed, scales, zeros, scheme, in_features, x.ty.dtype)
        return emit_linear(bb, x, w, bias)
    return emit_fused_quant_linear(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features)


def is_one_row(x: relax.Expr) -> bool:
    """``x [..., K]`` has statically one row: every dim but the last is the constant 1."""
    return all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in list(x.ty.shape.values)[:-1])


def _codebook(scheme: Scheme) -> relax.Expr | None:
    return relax.const(np.asarray(scheme.codebook, np.float32)) if scheme.codebook is not None else None


def emit_fused_quant_linear(bb: relax.BlockBuilder, x: relax.Expr, packed: relax.Expr, scales: relax.Expr,
                            zeros: relax.Expr | None, bias: relax.Expr | None, scheme: Scheme,
                            out_features: int, in_features: int) -> relax.Expr:
    """One TE compute, the dequantize inlined into the reduction (dlight's GEMV form for M = 1)."""
    codebook = _codebook(scheme)
    present = (zeros is not None, codebook is not None, bias is not None)
    operands = [part for part in (zeros, codebook, bias) if part is not None]

    def compute(x, packed, scales, *rest):  # emit_te passes TVM values only: rest is [zeros][codebook][bias]
        rest = list(rest)
        parts = [rest.pop(0) if there else None for there in present]
        return quant_linear_te(x, packed, scales, *parts, scheme=scheme, in_features=in_features)

    return _emit_2d(bb, x, in_features, out_features, lambda x2d: bb.emit_te(
        compute, x2d, packed, scales, *operands, primfunc_name_hint="quant_linear"))


def emit_dequantized_weight(bb: relax.BlockBuilder, packed: relax.Expr, scales: relax.Expr,
                            zeros: relax.Expr | None, scheme: Scheme, in_features: int,
                            dtype: str) -> relax.Expr:
    """The dense weight ``[N, K]`` in ``dtype`` (computed in f32, then rounded), one elementwise kernel."""
    codebook = _codebook(scheme)
    present = (zeros is not None, codebook is not None)
    operands = [part for part in (zeros, codebook) if part is not None]

    def compute(packed, scales, *rest):  # rest is [zeros][codebook]
        rest = list(rest)
        parts = [rest.pop(0) if there else None for there in present]
        value = dequantized_weight(scheme, in_features, packed, scales, *parts)
        return te.compute((packed.shape[0], in_features), lambda n, k: value(n, k).astype(dtype),
                          name="dequantize_weight")

    return bb.emit_te(compute, packed, scales, *operands, primfunc_name_hint="dequantize_weight")


def supports_quant_linear(scheme: Scheme, out_features: int, in_features: int) -> bool:
    """Integer schemes, any shape. Not codebook schemes (NF4, FP8): dlight's GEMV analysis (TVM 0.27)
    fails an assertion on the table lookup ``codebook[code]``, so they take the generic path."""
    return scheme.codebook is None and scheme.supports(in_features)
