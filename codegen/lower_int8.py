"""How ``linear_w8a8`` (int8 activations x int8 weights) and ``linear_w4a8`` (int8 activations x
symmetric 4-bit weights, ir/int8_ops.py) become Relax.

LLVM (CPU) targets get the hand-scheduled kernels of kernels/cpu_int8_linear.py and
kernels/cpu_w4a8_linear.py (VNNI where the CPU has it; W4A8 for groups of 32, 64 or 128). Other targets get :func:`w8a8_linear_te`, the op's definition as TE computes (per-row
quantization, an int32 reduction over int8 products, the scale epilogue), left to the target's
schedule rules. Registered into ``LOWERINGS`` by the import at the end of lower_ops.py.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from ..ir.int8_ops import w4a8_scheme
from .kernels.cpu_int8_linear import emit_w8a8_linear
from .kernels.cpu_w4a8_linear import emit_w4a8_linear, supports_w4a8
from .lower_ops import lowers


def _quantized_rows(x: te.Tensor) -> tuple[te.Tensor, te.Tensor]:
    """int32 codes ``[M, K]`` and f32 scales ``[M]`` of ``ir.int8_ops.quantize_rows_int8``."""
    m, k = x.shape
    r = te.reduce_axis((0, k), name="r")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, r]), axis=r), name="row_amax")
    scale = te.compute((m,), lambda i: tirx.Select(amax[i] > tirx.const(0, "float32"),
                                                    amax[i] / tirx.const(127, "float32"),
                                                    tirx.const(1, "float32")), name="row_scale")
    codes = te.compute((m, k), lambda i, j: tirx.Cast("int32", tirx.max(tirx.min(
        tirx.nearbyint(x[i, j] / scale[i]), tirx.const(127, "float32")), tirx.const(-127, "float32"))),
        name="row_codes")
    return codes, scale


def w8a8_linear_te(x: te.Tensor, codes: te.Tensor, scales: te.Tensor, *bias: te.Tensor) -> te.Tensor:
    """``linear_w8a8`` on x f32 ``[M, K]``, codes u32 ``[N, ceil(K/4)]``, scales ``[N, 1]``[, bias ``[N]``]."""
    xq, x_scale = _quantized_rows(x)
    k = te.reduce_axis((0, x.shape[1]), name="k")

    def weight_code(n, kk):  # the signed code: byte kk % 4 of word kk // 4, minus the offset 128
        word = codes[n, tirx.floordiv(kk, 4)]
        byte = tirx.bitwise_and(tirx.shift_right(word, tirx.Cast("uint32", tirx.floormod(kk, 4) * 8)),
                                tirx.const(255, "uint32"))
        return tirx.Cast("int32", byte) - 128

    acc = te.compute((x.shape[0], codes.shape[0]), lambda i, n: te.sum(xq[i, k] * weight_code(n, k), axis=k),
                     name="int8_matmul")

    def value(i, n):
        y = tirx.Cast("float32", acc[i, n]) * (x_scale[i] * scales[n, 0])
        return y + bias[0][n] if bias else y

    return te.compute(acc.shape, value, name="w8a8_scale")


@lowers("linear_w8a8")
def _linear_w8a8(ctx, node, args):
    x, codes, scales, *bias = args
    target = tvm.target.Target.current(allow_none=True)
    if target is not None and target.kind.name == "llvm":
        return emit_w8a8_linear(ctx.bb, x, codes, scales, bias[0] if bias else None,
                                out_features=node.type.shape[-1], target=target)
    shape = [ctx.dim(d) for d in ctx.types[node.inputs[0]].shape]
    x2d = ctx.bb.emit(relax.op.reshape(x, [-1, shape[-1]]))
    y = ctx.bb.emit_te(w8a8_linear_te, x2d, codes, scales, *bias, primfunc_name_hint="linear_w8a8")
    return relax.op.reshape(y, shape[:-1] + [node.type.shape[-1]])


# ---- linear_w4a8: int8 activations x symmetric 4-bit weights ---------------------------------

def w4a8_linear_te(x: te.Tensor, codes: te.Tensor, scales: te.Tensor, *bias: te.Tensor, group: int) -> te.Tensor:
    """``linear_w4a8`` on x f32 ``[M, K]``, codes u32 ``[N, K/8]``, scales ``[N, groups]``[, bias ``[N]``]
    as TE computes, for targets and shapes without the CPU kernel: the same quantization and exact
    int32 group sums; the groups are summed in f32 in the order the schedule picks (not the op's fma
    chain: equal to a few ulps)."""
    m, k = x.shape
    k_static, groups = int(k), int(scales.shape[1])
    zero, top = tirx.const(0, "float32"), tirx.const(127, "float32")
    r = te.reduce_axis((0, group), name="r")

    def inside(g, j):
        return g * group + j < k_static

    amax = te.compute((m, groups), lambda i, g: te.max(tirx.Select(
        inside(g, r), tirx.abs(x[i, tirx.min(g * group + r, k_static - 1)]), zero), axis=r), name="group_amax")
    sx = te.compute((m, groups), lambda i, g: tirx.Select(amax[i, g] > zero, amax[i, g] / top,
                                                          tirx.const(1, "float32")), name="group_scale")
    xq = te.compute((m, k), lambda i, j: tirx.Cast("int32", tirx.max(tirx.min(
        tirx.nearbyint(x[i, j] / sx[i, tirx.floordiv(j, group)]), top), -top)), name="group_codes")

    def level(n, j):  # code j of row n minus the offset 8
        word = codes[n, tirx.floordiv(j, 8)]
        nibble = tirx.bitwise_and(tirx.shift_right(word, tirx.Cast("uint32", tirx.floormod(j, 8) * 4)),
                                  tirx.const(15, "uint32"))
        return tirx.Cast("int32", nibble) - 8

    r2 = te.reduce_axis((0, group), name="r2")
    isum = te.compute((m, codes.shape[0], groups), lambda i, n, g: te.sum(tirx.Select(
        inside(g, r2), xq[i, tirx.min(g * group + r2, k_static - 1)] * level(n, tirx.min(g * group + r2, k_static - 1)),
        0), axis=r2), name="group_isum")
    gr = te.reduce_axis((0, groups), name="gr")
    y = te.compute((m, codes.shape[0]), lambda i, n: te.sum(
        tirx.Cast("float32", isum[i, n, gr]) * (sx[i, gr] * scales[n, gr]), axis=gr), name="w4a8_sum")
    if not bias:
        return y
    return te.compute(y.shape, lambda i, n: y[i, n] + bias[0][n], name="w4a8_bias")


@lowers("linear_w4a8")
def _linear_w4a8(ctx, node, args):
    x, codes, scales, *bias = args
    x_type = ctx.types[node.inputs[0]]
    n, k = node.type.shape[-1], x_type.shape[-1]
    scheme = w4a8_scheme(node.attr["scheme"], k)
    target = tvm.target.Target.current(allow_none=True)
    if target is not None and target.kind.name == "llvm" and supports_w4a8(scheme, k):
        y = emit_w4a8_linear(ctx.bb, x, codes, scales, out_features=n, group=scheme.group_of(k), target=target)
        return relax.op.add(y, bias[0]) if bias else y
    shape = [ctx.dim(d) for d in x_type.shape]
    x2d = ctx.bb.emit(relax.op.reshape(x, [-1, shape[-1]]))
    y = ctx.bb.emit_te(w4a8_linear_te, x2d, codes, scales, *bias, group=scheme.group_of(k),
                       primfunc_name_hint="linear_w4a8")
    return relax.op.reshape(y, shape[:-1] + [n])
