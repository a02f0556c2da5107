"""Fused causal grouped-query attention for the CPU: one pass over the keys, online softmax.

Per (query row, head) the kernel walks the keys in tiles of ``KEY_TILE``: a tile's scores are
computed as vectors over the keys (``q[d]`` broadcast times a contiguous row of the transposed
keys ``k_t[kv_head, d, :]``), masked, and folded into a running max / sum / output accumulator
(the flash-attention recurrence), so no ``[heads, s, t]`` score matrix is ever materialized and
the only buffers are a tile of scores and one output row (stack-sized, so LLVM keeps them in
registers). Rows run in parallel. Query ``i`` of ``s`` sees keys ``j <= i + (t - s)``: the
queries are the last ``s`` of ``t`` positions (prefill: s = t; decode: s = 1).
"""

from __future__ import annotations

from functools import cache

from tvm import relax, te, tirx
from tvm.script import tirx as T

KEY_TILE = 64
"""Keys per tile: four AVX-512 vectors of scores (sixteen NEON vectors on aarch64, where the kernel,
plain vector code with no x86 instructions, runs as it is)."""

_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the kernel alone
_NEG_INF = -3.0e38


_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)
"""Cephes' expf polynomial for exp(r) - 1 - r over |r| <= ln(2) / 2 (coefficients of r**7 ... r**2)."""


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) in f32 without libm (libm's expf is a call per lane; this vectorizes): Cephes' expf,
    x = n ln2 + r, exp(r) by a degree-7 polynomial, times 2**n built in the exponent bits. Within
    2 ulp of expf for x in [-87, 88]; exactly 0 below (the masked scores' -3e38)."""
    f32 = lambda value: tirx.const(value, "float32")  # noqa: E731
    low = f32(-87.0)
    clamped = tirx.min(tirx.max(x, low), f32(88.0))
    n = tirx.floor(clamped * f32(1.44269504088896341) + f32(0.5))
    r = clamped - n * f32(0.693359375) - n * f32(-2.12194440e-4)  # ln 2 in two parts: n * hi is exact
    poly = f32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = poly * r + f32(c)
    value = poly * r * r + r + f32(1)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return tirx.Select(x < low, f32(0), value * two_n)


@cache  # one kernel per shape, asked for by every layer
def make_attention(heads: int, kv_heads: int, head_dim: int, scale: float, causal: bool) -> tirx.PrimFunc:
    """``o[1, s, heads, d] = softmax(q k^T * scale + causal mask) v`` with k given transposed."""
    group, tile, dim = heads // kv_heads, KEY_TILE, head_dim

    @T.macro
    def row_attention(q, k_t, v, o, i, h, s, t):
        acc = T.alloc_buffer((dim,), "float32", scope="global")
        score = T.alloc_buffer((tile,), "float32", scope="global")
        stats = T.alloc_buffer((3,), "float32", scope="global")  # running max, sum, previous max
        for d in T.vectorized(dim):
            acc[d] = T.float32(0)
        stats[0] = T.float32(_NEG_INF)
        stats[1] = T.float32(0)
        for jt in range(T.ceildiv(T.min(i + (t - s) + 1, t) if causal else t, tile)):
            for jj in T.vectorized(tile):
                score[jj] = T.float32(0)
            for d in range(dim):
                for jj in T.vectorized(tile):
                    score[jj] = score[jj] + q[0, i, h, d] * k_t[0, h // group, d, jt * tile + jj]
            for jj in T.vectorized(tile):
                score[jj] = T.if_then_else(
                    jt * tile + jj < (T.min(i + (t - s) + 1, t) if causal else t),
                    score[jj] * T.float32(scale), T.float32(_NEG_INF))
            stats[2] = stats[0]
            for jj in range(tile):
                stats[0] = T.max(stats[0], score[jj])
            for jj in T.vectorized(tile):
                score[jj] = T.exp(score[jj] - stats[0])
            stats[1] = stats[1] * T.exp(stats[2] - stats[0])
            for jj in range(tile):
                stats[1] = stats[1] + score[jj]
            for d in T.vectorized(dim):
                acc[d] = acc[d] * T.exp(stats[2] - stats[0])
            for jj in range(tile):
                for d in T.vectorized(dim):
                    acc[d] = acc[d] + score[jj] * v[0, T.min(jt * tile + jj, t - 1), h // group, d]
        for d in T.vectorized(dim):
            o[0, i, h, d] = acc[d] / stats[1]

    @T.prim_func(private=True)
    def attention(var_q: T.handle, var_k_t: T.handle, var_v: T.handle, var_o: T.handle):
        T.func_attr({"op_pattern": _OPAQUE, "tirx.noalias": True, "tirx.is_scheduled": True})
        s = T.int64()
        t = T.int64()
        t_padded = T.int64()
        q = T.match_buffer(var_q, (1, s, heads, dim), "float32")
        k_t = T.match_buffer(var_k_t, (1, kv_heads, dim, t_padded), "float32")
        v = T.match_buffer(var_v, (1, t, kv_heads, dim), "float32")
        o = T.match_buffer(var_o, (1, s, heads, dim), "float32")
        for row in T.parallel(s * heads):
            row_attention(q, k_t, v, o, row // heads, row % heads, s, t)

    return attention


DECODE_KEY_TILE = 16
"""Keys per tile of the one-query (decode) kernel: its dot products are independent of each other,
so out-of-order execution overlaps them; the running max and the output rescale are per tile."""

_MAX_HALVINGS = 7  # head_dim up to 128 folds down to one lane


def _fold_half(width: int):
    """prod[row, :width] += prod[row, width:2 * width], as one vector add."""
    @T.macro
    def fold(prod, row):
        for d in T.vectorized(width):
            prod[row, d] = prod[row, d] + prod[row, d + width]
    return fold


@T.macro
def _nothing(prod, row):
    T.evaluate(0)


@cache
def make_decode_attention(heads: int, kv_heads: int, head_dim: int, scale: float,
                          positions: bool = False, int8_cache: bool = False) -> tirx.PrimFunc:
    """The one-query case (decode): keys are read in the cache's own layout, no transpose.

    KV heads run in parallel. Each walks its keys once, in tiles of ``DECODE_KEY_TILE``, for all
    its query heads together, so each key and value is read once, not once per query head (on
    SmolLM2's shape, 9 query heads on 3 KV heads: 5.7-6.8 us hot, 31-44 us with the cache cold in
    memory, against 7.6 and 49 us for one query head at a time; all KV heads in one walk, reading
    whole cache rows, spills its registers and runs 7x slower). Per key and
    query head the score is a dot product over ``head_dim`` (vector multiply, then halving vector
    adds down to one lane, or to an odd width summed serially) that depends on no other, so the
    CPU overlaps them; per tile and query head, the tile's max, its probabilities as one vector of
    exps, one rescale of the running sum and output (the online softmax, per tile rather than per
    key), then the weighted sum of the tile's values, again row by row.
    Only the live keys are read: the single query sees every key (``positions``: the keys
    ``0 .. pos[0]`` of a cache buffer with more rows, the later rows never read), so there is no
    mask beyond the last tile's padding, whose scores are -inf (probability 0).

    ``int8_cache`` (with ``positions``; ``attention_i8_cache``): the cache buffers hold int8 codes
    with an f32 scale per (row, KV head), and the step's own rows come in f32 (``k_new``,
    ``v_new``): key ``j < pos`` scores ``(q . codes_j) * scale_j``, the key at ``pos`` is ``k_new``;
    the values likewise. The codes are converted in registers: no dequantized cache is written.
    """
    if int8_cache and not positions:
        raise ValueError("make_decode_attention: int8_cache needs positions (a cache buffer and pos)")
    group, dim, tile = heads // kv_heads, head_dim, DECODE_KEY_TILE
    halvings = []
    width = dim
    while width % 2 == 0 and width > 1 and len(halvings) < _MAX_HALVINGS:
        width //= 2
        halvings.append(_fold_half(width))
    halvings += [_nothing] * (_MAX_HALVINGS - len(halvings))
    fold0, fold1, fold2, fold3, fold4, fold5, fold6 = halvings

    @T.macro
    def kv_head_attention(q, k, k_scale, k_new, v, v_scale, v_new, o, g, t):
        # int8_cache: k, v are codes, k_scale, v_scale their row scales, and row t - 1 is k_new, v_new
        acc = T.alloc_buffer((group, dim), "float32", scope="global")
        prod = T.alloc_buffer((group, dim), "float32", scope="global")
        score = T.alloc_buffer((group, tile), "float32", scope="global")
        stats = T.alloc_buffer((group, 4), "float32", scope="global")  # max, sum, previous max, rescale
        for hh in range(group):
            for d in T.vectorized(dim):
                acc[hh, d] = T.float32(0)
            stats[hh, 0] = T.float32(_NEG_INF)
            stats[hh, 1] = T.float32(0)
        for jt in range(T.ceildiv(t, tile)):
            for hh in range(group):
                for jj in T.vectorized(tile):
                    score[hh, jj] = T.float32(_NEG_INF)
            for jj in range(T.min(tile, t - jt * tile)):
                for hh in T.unroll(group):
                    if not int8_cache:
                        for d in T.vectorized(dim):
                            prod[hh, d] = q[0, 0, g * group + hh, d] * k[0, jt * tile + jj, g, d]
                    elif jt * tile + jj < t - 1:
                        for d in T.vectorized(dim):
                            prod[hh, d] = q[0, 0, g * group + hh, d] * T.Cast("float32", k[0, jt * tile + jj, g, d])
                    else:
                        for d in T.vectorized(dim):
                            prod[hh, d] = q[0, 0, g * group + hh, d] * k_new[0, 0, g, d]
                    fold0(prod, hh)
                    fold1(prod, hh)
                    fold2(prod, hh)
                    fold3(prod, hh)
                    fold4(prod, hh)
                    fold5(prod, hh)
                    fold6(prod, hh)
                    score[hh, jj] = prod[hh, 0]
                    for d in range(1, width):
                        score[hh, jj] = score[hh, jj] + prod[hh, d]
                    if int8_cache:
                        score[hh, jj] = score[hh, jj] * (T.float32(scale) * T.if_then_else(
                            jt * tile + jj < t - 1, k_scale[0, jt * tile + jj, g], T.float32(1)))
                    else:
                        score[hh, jj] = score[hh, jj] * T.float32(scale)
            for hh in range(group):
                stats[hh, 2] = stats[hh, 0]
                for jj in range(tile):
                    stats[hh, 0] = T.max(stats[hh, 0], score[hh, jj])
                for jj in T.vectorized(tile):
                    score[hh, jj] = fast_exp(score[hh, jj] - stats[hh, 0])
                stats[hh, 3] = fast_exp(stats[hh, 2] - stats[hh, 0])
                stats[hh, 1] = stats[hh, 1] * stats[hh, 3]
                for jj in range(tile):
                    stats[hh, 1] = stats[hh, 1] + score[hh, jj]
                for d in T.vectorized(dim):
                    acc[hh, d] = acc[hh, d] * stats[hh, 3]
            for jj in range(T.min(tile, t - jt * tile)):
                for hh in T.unroll(group):
                    if not int8_cache:
                        for d in T.vectorized(dim):
                            acc[hh, d] = acc[hh, d] + score[hh, jj] * v[0, jt * tile + jj, g, d]
                    elif jt * tile + jj < t - 1:
                        for d in T.vectorized(dim):
                            acc[hh, d] = acc[hh, d] + score[hh, jj] * v_scale[0, jt * tile + jj, g] * T.Cast(
                                "float32", v[0, jt * tile + jj, g, d])
                    else:
                        for d in T.vectorized(dim):
                            acc[hh, d] = acc[hh, d] + score[hh, jj] * v_new[0, 0, g, d]
        for hh in range(group):
            for d in T.vectorized(dim):
                o[0, 0, g * group + hh, d] = acc[hh, d] / stats[hh, 1]

    # only the kernel asked for is parsed: the others would index the macro's unused buffers
    if int8_cache:
        @T.prim_func(private=True)
        def decode_attention_i8(q: T.Buffer((1, 1, heads, dim), "float32"), var_k: T.handle, var_k_scale: T.handle,
                                k_new: T.Buffer((1, 1, kv_heads, dim), "float32"), var_v: T.handle,
                                var_v_scale: T.handle, v_new: T.Buffer((1, 1, kv_heads, dim), "float32"),
                                pos: T.Buffer((1,), "int32"), o: T.Buffer((1, 1, heads, dim), "float32")):
            T.func_attr({"op_pattern": _OPAQUE, "tirx.noalias": True, "tirx.is_scheduled": True})
            capacity = T.int64()
            k = T.match_buffer(var_k, (1, capacity, kv_heads, dim), "int8")
            k_scale = T.match_buffer(var_k_scale, (1, capacity, kv_heads), "float32")
            v = T.match_buffer(var_v, (1, capacity, kv_heads, dim), "int8")
            v_scale = T.match_buffer(var_v_scale, (1, capacity, kv_heads), "float32")
            for g in T.parallel(kv_heads):
                kv_head_attention(q, k, k_scale, k_new, v, v_scale, v_new, o, g,
                                  T.min(T.Cast("int64", pos[0]) + 1, capacity))

        return decode_attention_i8
    if positions:
        @T.prim_func(private=True)
        def decode_attention_at(q: T.Buffer((1, 1, heads, dim), "float32"), var_k: T.handle, var_v: T.handle,
                                pos: T.Buffer((1,), "int32"), o: T.Buffer((1, 1, heads, dim), "float32")):
            T.func_attr({"op_pattern": _OPAQUE, "tirx.noalias": True, "tirx.is_scheduled": True})
            capacity = T.int64()
            k = T.match_buffer(var_k, (1, capacity, kv_heads, dim), "float32")
            v = T.match_buffer(var_v, (1, capacity, kv_heads, dim), "float32")
            for g in T.parallel(kv_heads):
                kv_head_attention(q, k, k, k, v, v, v, o, g, T.min(T.Cast("int64", pos[0]) + 1, capacity))

        return decode_attention_at

    @T.prim_func(private=True)
    def decode_attention(q: T.Buffer((1, 1, heads, dim), "float32"), var_k: T.handle, var_v: T.handle,
                         o: T.Buffer((1, 1, heads, dim), "float32")):
        T.func_attr({"op_pattern": _OPAQUE, "tirx.noalias": True, "tirx.is_scheduled": True})
        t = T.int64()
        k = T.match_buffer(var_k, (1, t, kv_heads, dim), "float32")
        v = T.match_buffer(var_v, (1, t, kv_heads, dim), "float32")
        for g in T.parallel(kv_heads):
            kv_head_attention(q, k, k, k, v, v, v, o, g, t)

    return decode_attention


def transpose_keys_te(k: te.Tensor) -> te.Tensor:
    """k [1, t, kv_heads, d] -> [1, kv_heads, d, t rounded up to KEY_TILE], zero-padded, so that
    every key tile is one contiguous vector load with no bounds clamp."""
    t = k.shape[1]
    padded = (t + KEY_TILE - 1) // KEY_TILE * KEY_TILE
    return te.compute((1, k.shape[2], k.shape[3], padded),
                      lambda b, g, d, j: tirx.if_then_else(j < t, k[b, tirx.min(j, t - 1), g, d],
                                                          tirx.const(0, k.dtype)),
                      name="transpose_keys")


def emit_attention(bb: relax.BlockBuilder, q, k, v, *, heads: int, kv_heads: int, head_dim: int,
                   scale: float, causal: bool, pos=None, i8_cache=None) -> relax.Expr:
    """q: [1, s, heads, d]; k, v: [1, t, kv_heads, d] -> [1, s, heads, d]. ``pos`` (i32[s], decode
    only): the query's key position, the keys after it unread; None: the queries end the keys.
    ``i8_cache`` (one query at ``pos`` only; ``attention_i8_cache``): ``(k_scale, k_new, v_scale,
    v_new)``, with ``k`` and ``v`` the int8 codes of the cache buffers."""
    one_query = isinstance(q.ty.shape.values[1], tirx.IntImm) and int(q.ty.shape.values[1]) == 1
    if i8_cache is not None:
        if not (one_query and causal and pos is not None):
            raise NotImplementedError("cpu attention over an int8 cache: one query at a position only")
        k_scale, k_new, v_scale, v_new = i8_cache
        func = make_decode_attention(heads, kv_heads, head_dim, scale, positions=True, int8_cache=True)
        gv = bb.add_func(func, f"decode_attention_i8_h{heads}_kv{kv_heads}_d{head_dim}")
        return relax.call_tir(gv, [q, k, k_scale, k_new, v, v_scale, v_new, pos],
                              relax.TensorType(q.ty.shape, "float32"))
    if one_query and (pos is None or causal):
        func = make_decode_attention(heads, kv_heads, head_dim, scale, positions=pos is not None)
        gv = bb.add_func(func, f"decode_attention_h{heads}_kv{kv_heads}_d{head_dim}{'_at' if pos is not None else ''}")
        args = [q, k, v] if pos is None else [q, k, v, pos]
        return relax.call_tir(gv, args, relax.TensorType(q.ty.shape, "float32"))
    if pos is not None:
        raise NotImplementedError("cpu attention: positions with more than one query")
    func = make_attention(heads, kv_heads, head_dim, scale, causal)
    gv = bb.add_func(func, f"attention_h{heads}_kv{kv_heads}_d{head_dim}{'_causal' if causal else ''}")
    k_t = bb.emit_te(transpose_keys_te, k, primfunc_name_hint="transpose_keys")
    return relax.call_tir(gv, [q, k_t, v], relax.TensorType(q.ty.shape, "float32"))
