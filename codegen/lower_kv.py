"""Lowerings of the int8-rows ops (``row_scale_i8``, ``quantize_rows_i8``, ``dequantize_rows_i8``):
the int8 KV cache of ``quantize-kv-cache``, as small TE computes.

They match the numpy semantics in ``ir/ops.py`` exactly: the scale is ``max |x| / 127`` (1 for a zero
row) and codes round half to even (``nearbyint``; Relax's ``round`` rounds half away from zero).
"""

from __future__ import annotations

from tvm import te, tirx

from ..ir.ops import I8_MAX
from .lower_ops import lowers


def _row_scale_te(x: te.Tensor):
    """f32[...]: max |x| over the last axis / 127, or 1 where the row is all zeros."""
    r = te.reduce_axis((0, x.shape[-1]), name="r")
    absmax = te.compute(x.shape[:-1], lambda *i: te.max(tirx.abs(x[i + (r,)]), axis=r), name="row_absmax")
    zero, one = tirx.const(0, "float32"), tirx.const(1, "float32")
    return te.compute(absmax.shape, lambda *i: tirx.Select(
        absmax[i] == zero, one, absmax[i] / tirx.const(I8_MAX, "float32")), name="row_scale_i8")


def _quantize_rows_te(x: te.Tensor, scale: te.Tensor):
    """i8 codes: clip(round_half_even(x / scale of the row), -127, 127)."""
    low, high = tirx.const(-I8_MAX, "float32"), tirx.const(I8_MAX, "float32")
    return te.compute(x.shape, lambda *i: tirx.Cast("int8", tirx.max(tirx.min(
        tirx.nearbyint(x[i] / scale[i[:-1]]), high), low)), name="quantize_rows_i8")


def _dequantize_rows_te(codes: te.Tensor, scale: te.Tensor):
    """f32: codes * scale of the row."""
    return te.compute(codes.shape, lambda *i: tirx.Cast("float32", codes[i]) * scale[i[:-1]],
                      name="dequantize_rows_i8")


@lowers("row_scale_i8")
def _row_scale_i8(ctx, node, args):
    return ctx.bb.emit_te(_row_scale_te, args[0], primfunc_name_hint="row_scale_i8")


@lowers("quantize_rows_i8")
def _quantize_rows_i8(ctx, node, args):
    return ctx.bb.emit_te(_quantize_rows_te, *args, primfunc_name_hint="quantize_rows_i8")


@lowers("dequantize_rows_i8")
def _dequantize_rows_i8(ctx, node, args):
    return ctx.bb.emit_te(_dequantize_rows_te, *args, primfunc_name_hint="dequantize_rows_i8")
