"""Lowerings of the KV-cache ops.

``kv_write`` writes the new rows into the cache buffer in place (``call_tir_inplace``: the decode
step costs one row, not a copy of the cache). The int8-rows ops (``row_scale_i8``,
``quantize_rows_i8``, ``dequantize_rows_i8``) of ``quantize-kv-cache`` are small TE computes that
match the numpy semantics in ``ir/int8_ops.py`` exactly: the scale is ``max |x| / 127`` (1 for a zero
row) and codes round half to even (``nearbyint``; Relax's ``round`` rounds half away from zero).
``attention_i8_cache`` goes to the target's attention kernel for int8 caches when it has one (the
CPU's reads the codes), else to a dequantized copy of the cache and the plain attention lowering.
"""

from __future__ import annotations

from functools import cache

from tvm import relax, te, tirx
from tvm.script import tirx as T

from ..ir.int8_ops import I8_MAX
from .lower_ops import attention_shape, lower_attention, lowers


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


@cache  # one kernel per row shape, asked for by every layer
def make_kv_write(row_shape: tuple[int, ...], dtype: str) -> tirx.PrimFunc:
    """``cache[0, pos[0] + j, ...] = new[0, j, ...]``, in place on ``cache`` [1, capacity, *row_shape]."""
    if len(row_shape) == 2:
        heads, dim = row_shape

        @T.prim_func(private=True, s_tir=True)
        def kv_write(var_cache: T.handle, var_new: T.handle, var_pos: T.handle):
            T.func_attr({"tirx.noalias": True})
            capacity, s = T.int64(), T.int64()
            cache = T.match_buffer(var_cache, (1, capacity, heads, dim), dtype)
            new = T.match_buffer(var_new, (1, s, heads, dim), dtype)
            pos = T.match_buffer(var_pos, (s,), "int32")
            for j, h, d in T.grid(s, heads, dim):
                with T.sblock("kv_write"):
                    vj, vh, vd = T.axis.remap("SSS", [j, h, d])
                    cache[0, T.Cast("int64", pos[0]) + vj, vh, vd] = new[0, vj, vh, vd]
        return kv_write
    if len(row_shape) == 1:
        (heads,) = row_shape

        @T.prim_func(private=True, s_tir=True)
        def kv_write_rows(var_cache: T.handle, var_new: T.handle, var_pos: T.handle):
            T.func_attr({"tirx.noalias": True})
            capacity, s = T.int64(), T.int64()
            cache = T.match_buffer(var_cache, (1, capacity, heads), dtype)
            new = T.match_buffer(var_new, (1, s, heads), dtype)
            pos = T.match_buffer(var_pos, (s,), "int32")
            for j, h in T.grid(s, heads):
                with T.sblock("kv_write"):
                    vj, vh = T.axis.remap("SS", [j, h])
                    cache[0, T.Cast("int64", pos[0]) + vj, vh] = new[0, vj, vh]
        return kv_write_rows
    raise NotImplementedError(f"kv_write: caches of rank {len(row_shape) + 2}")


@lowers("kv_write")
def _kv_write(ctx, node, args):
    return kv_write_call(ctx.bb, *args)


def kv_write_call(bb: relax.BlockBuilder, cache: relax.Expr, new: relax.Expr, pos: relax.Expr) -> relax.Expr:
    """``kv_write(cache, new, pos)``, in place on ``cache`` [1, capacity, *static row shape]."""
    shape = cache.ty.shape.values
    if not all(isinstance(d, tirx.IntImm) for d in (shape[0], *shape[2:])) or int(shape[0]) != 1:
        raise NotImplementedError(f"kv_write: cache {cache.ty} (batch 1 and static rows only)")
    row_shape = tuple(int(d) for d in shape[2:])
    func = make_kv_write(row_shape, str(cache.ty.dtype))
    gv = bb.add_func(func, f"kv_write_{'x'.join(map(str, row_shape))}_{cache.ty.dtype}")
    return relax.call_tir_inplace(gv, [cache, new, pos], inplace_indices=[0], out_ty=cache.ty)


@lowers("attention_i8_cache")
def _attention_i8_cache(ctx, node, args):
    """The target's kernel reading the codes (one query, causal), else the cache dequantized whole,
    the step's rows written over it, and ``attention``'s lowering."""
    q, k_codes, k_scale, k_new, v_codes, v_scale, v_new, pos = args
    shape = attention_shape(ctx, node)
    if ctx.emit_attention is not None and node.type.shape[1] == 1 and shape["causal"]:
        return ctx.emit_attention(ctx.bb, q, k_codes, v_codes, pos=pos, i8_cache=(k_scale, k_new, v_scale, v_new),
                                  **shape)
    keys, values = (ctx.bb.emit(kv_write_call(ctx.bb, ctx.bb.emit_te(
        _dequantize_rows_te, codes, scale, primfunc_name_hint="dequantize_rows_i8"), new, pos))
        for codes, scale, new in ((k_codes, k_scale, k_new), (v_codes, v_scale, v_new)))
    return lower_attention(ctx, q, keys, values, pos, **shape)
