"""The target-independent TE definition of a weight-quantized linear (what any schedule must compute).

Operands are in the IR's layout (ir/quant_schemes.py): ``packed`` u32 ``[N, words]`` holding the
codes of each row little-end first, ``scales`` (and, for schemes with zero points, ``zeros``) f32
``[N, groups]``, and for codebook schemes a f32 ``codebook`` table of ``2**bits`` levels.
:func:`dequantized_weight` is an element expression, inlined into whatever reads it, e.g. the
reduction of :func:`quant_linear_te` (one ``te.compute``, the form dlight's GPU GEMV rule
recognizes as a dequantize fused into a matrix-vector product: decode), or a ``te.compute`` of the
dense weight (GPU prefill, whose matmul then reads it: codegen/kernels/gpu_linear.py).

The CPU kernels (cpu_quant_linear.py) compute the same function on a repacked layout with their
own loop nests; the generic ``dequantize`` lowering materializes :func:`dequantized_weight`.
"""

from __future__ import annotations

from typing import Callable

from tvm import te, tirx

from ...ir.quant_schemes import Scheme


def code_at(packed: te.Tensor, scheme: Scheme, row, k) -> tirx.PrimExpr:
    """The uint32 code of input feature ``k`` of ``row``: one shift and one mask of its word."""
    per_word = scheme.codes_per_word
    shift = tirx.Cast("uint32", tirx.floormod(k, per_word) * scheme.bits)
    word = packed[row, tirx.floordiv(k, per_word)]
    return tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(2 ** scheme.bits - 1, "uint32"))


def dequantized_weight(scheme: Scheme, in_features: int, packed: te.Tensor, scales: te.Tensor,
                       zeros: te.Tensor | None = None, codebook: te.Tensor | None = None) -> Callable:
    """``w(n, k)``: the f32 weight the ``dequantize`` op gives at ``[n, k]``, as a TIR expression.

    Integer schemes: ``(code - zero) * scale`` (zero: the group's zero point, or ``2**(bits-1)``
    when symmetric). Codebook schemes: ``codebook[code] * scale``. The group of ``k`` is
    ``k // group``, a short last group (``group`` not dividing ``in_features``) included.
    """
    group = scheme.group_of(in_features)
    if (zeros is not None) != scheme.has_zeros or (codebook is not None) != (scheme.codebook is not None):
        raise ValueError(f"dequantize {scheme.name}: zeros/codebook operands do not match the scheme")

    def value(n, k):
        code = code_at(packed, scheme, n, k)
        g = tirx.floordiv(k, group)
        if codebook is not None:
            level = codebook[tirx.Cast("int32", code)]
        else:
            zero = zeros[n, g] if zeros is not None else tirx.const(scheme.offset, "float32")
            level = tirx.Cast("float32", code) - zero
        return level * scales[n, g]

    return value


def quant_linear_te(x: te.Tensor, packed: te.Tensor, scales: te.Tensor, zeros: te.Tensor | None,
                    codebook: te.Tensor | None, bias: te.Tensor | None, *, scheme: Scheme,
                    in_features: int) -> te.Tensor:
    """``y[m, n] = sum_k x[m, k] * w(n, k) (+ bias[n])`` for ``x`` ``[M, K]`` (M may be symbolic), f32
    or f16; the sum is f32 either way and ``y`` has ``x``'s dtype."""
    weight = dequantized_weight(scheme, in_features, packed, scales, zeros, codebook)
    k = te.reduce_axis((0, in_features), name="k")
    widen = (lambda v: v) if x.dtype == "float32" else (lambda v: v.astype("float32"))
    y = te.compute((x.shape[0], packed.shape[0]), lambda m, n: te.sum(widen(x[m, k]) * weight(n, k), axis=k),
                   name="quant_linear")
    if bias is None and x.dtype == "float32":
        return y
    return te.compute(y.shape, lambda m, n: (y[m, n] + (widen(bias[n]) if bias is not None else 0.0)).astype(x.dtype),
                      name="quant_linear_out")
