"""Hand-scheduled CPU kernels for ``linear_w8a8``: int8 activations x int8 weights -> int32 (ir/int8_ops.py).

One kernel per linear: it quantizes x per row, then multiplies in int8 with int32 accumulators.

Quantization (per row of x)
---------------------------
``scale = max|x| / 127`` (1 for a zero row), ``xq = clip(nearbyint(x / scale), -127, 127)`` as
int8 into a workspace ``[M, 4 * ceil(K / 4)]`` (zero-padded), and ``xsum = sum(xq)`` (int32):
exactly the op's reference (``nearbyint`` rounds half to even; max and integer sums are exact in
any order).

The dot product: u8 x s8 with the +128 trick
--------------------------------------------
AVX-512 VNNI's ``vpdpbusd acc, a, b`` adds to each int32 lane the 4 products of unsigned bytes of
``a`` and signed bytes of ``b``. The weight codes of the ``w8`` scheme already are unsigned bytes
``wq + 128``, so the kernels multiply them with the signed activations and correct once per output:
``sum_k (wq + 128) * xq = acc  =>  sum_k wq * xq = acc - 128 * xsum`` (exact: |acc| < 2^31 for
K < 66,000). Then ``y = f32(acc - 128 * xsum) * (x_scale * w_scale) (+ bias)``.

Weight layout
-------------
The u32 words of the codes (4 codes of one row, little-end first) in cpu_linear's block layout:
``q[nb, kq, j] = packed[64 * nb + j, kq]``. A 64-byte load of ``q[nb, kq, 16 v : 16 v + 16]`` holds
codes ``4 kq .. 4 kq + 3`` of 16 output channels, which is ``vpdpbusd``'s ``a`` operand; ``b`` is
the 4 bytes ``xq[m, 4 kq : 4 kq + 4]`` broadcast to all 16 lanes (an embedded ``{1to16}`` memory
operand). So a ``rows x 64`` output tile needs, per 4 input features, 4 weight loads and
``4 * rows`` ``vpdpbusd``: no horizontal sums, no unpacking. Codes stored in the IR's
``[N, ceil(K/4)]`` form are blocked inside the graph (a per-call copy: store them blocked).

GEMV (M == 1): quantize x, then parallel over N blocks, one 1 x 64 tile each (four independent
accumulator chains; the weight stream is the bound). GEMM (any M): quantize the rows in parallel,
then ``GEMM_ROWS x 64`` register tiles (24 int32 zmm accumulators) per (N block, row part) task,
with 4-, 2- and 1-row tiles for the ``M % GEMM_ROWS`` remainder, as in cpu_linear.make_gemm.

Without VNNI (``has_vnni``; never on aarch64) the same loop nests compute each 4-byte dot product
with shifts, masks and int32 multiply-adds (exact, portable, ~10x slower). aarch64 also keeps fewer
accumulator rows per GEMM tile (``cpu_isa.NEON``); its dot-product instructions are not used.
"""

from __future__ import annotations

from functools import cache

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .cpu_linear import (
    BLOCK_N,
    GEMM_ROWS,
    HALF,
    WEIGHT_LAYOUT,
    _kernel_attrs,
    _product,
    _static_or_symbolic_shape,
    _target_threads,
)
from .cpu_isa import vector_unit

LANES = 16
"""int32 lanes of an AVX-512 register: the output channels one ``vpdpbusd`` covers."""

VNNI = "llvm.x86.avx512.vpdpbusd.512"


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether the target's CPU has AVX-512 VNNI (512-bit ``vpdpbusd``)."""
    return bool(tvm.target.codegen.target_has_features("avx512vnni", target))


def emit_w8a8_linear(bb: relax.BlockBuilder, x: relax.Expr, codes: relax.Expr, scales: relax.Expr,
                     bias: relax.Expr | None, *, out_features: int, target: tvm.target.Target,
                     vnni: bool | None = None) -> relax.Expr:
    """Emit ``linear_w8a8(x, codes, scales[, bias])`` for x f32 ``[..., K]``; ``codes`` are u32, blocked
    ``[ceil(N/64), ceil(K/4), 64]`` (as stored) or ``[N, ceil(K/4)]``; ``scales`` ``[N, 1]`` or blocked.
    ``vnni``: use ``vpdpbusd`` (default: when the target's CPU has it)."""
    x_shape = _static_or_symbolic_shape(x)
    k, n = int(x_shape[-1]), out_features
    if len(codes.ty.shape.values) == 2:
        codes = bb.emit_te(WEIGHT_LAYOUT.pack_te, codes, primfunc_name_hint="block_int8_weight")
    scale_count = _product(list(scales.ty.shape.values))
    flat_scales = bb.emit(relax.op.reshape(scales, [scale_count]))
    rows = _product(x_shape[:-1])
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [rows, k]))
    shape = (n, k, scale_count, bias is not None, has_vnni(target) if vnni is None else vnni)
    if isinstance(rows, int) and rows == 1:
        kind, func = "gemv", make_w8a8_gemv(*shape)
    else:
        kind, func = "gemm", make_w8a8_gemm(*shape, threads=_target_threads(target), rows=vector_unit(target).gemm_rows)
    gv = bb.add_func(func, f"linear_w8a8_{kind}_n{n}_k{k}{'_bias' if bias is not None else ''}")
    args = [x2d, codes, flat_scales] + ([bias] if bias is not None else [])
    y2d = bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, n], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [n]))


def _quantize_row(k: int):
    """A macro quantizing row ``r`` of x into ``xq[r, :]``, ``xs[r]`` and ``xsum[r]`` (see above)."""
    main, padded = k // LANES * LANES, -(-k // 4) * 4

    @T.macro
    def quantize_row(x, xq, xs, xsum, r):
        amax = T.alloc_buffer((LANES,), "float32", scope="global")
        total = T.alloc_buffer((LANES,), "int32", scope="global")
        for j in T.vectorized(LANES):
            amax[j] = T.float32(0)
            total[j] = 0
        for ko in range(main // LANES):
            for j in T.vectorized(LANES):
                amax[j] = T.max(amax[j], T.abs(x[r, ko * LANES + j]))
        for kt in range(k - main):
            amax[0] = T.max(amax[0], T.abs(x[r, main + kt]))
        for j in range(1, LANES):
            amax[0] = T.max(amax[0], amax[j])
        xs[r] = T.Select(amax[0] > T.float32(0), amax[0] / T.float32(127), T.float32(1))
        for ko in range(main // LANES):
            for j in T.vectorized(LANES):
                xq[r, ko * LANES + j] = T.Cast("int8", T.max(T.min(
                    T.nearbyint(x[r, ko * LANES + j] / xs[r]), T.float32(127)), T.float32(-127)))
                total[j] = total[j] + T.Cast("int32", xq[r, ko * LANES + j])
        for kt in range(k - main):
            xq[r, main + kt] = T.Cast("int8", T.max(T.min(
                T.nearbyint(x[r, main + kt] / xs[r]), T.float32(127)), T.float32(-127)))
            total[0] = total[0] + T.Cast("int32", xq[r, main + kt])
        for kt in range(padded - k):
            xq[r, k + kt] = T.int8(0)
        xsum[r] = total[0]
        for j in range(1, LANES):
            xsum[r] = xsum[r] + total[j]

    return quantize_row


def _dot(vnni: bool):
    """A macro adding to tile row ``i`` (``acc[i, 0:HALF]``, output channels ``col0 ..``) the dot
    products of 4 codes ``q[jo, kq, col0 + j]`` with the 4 activations ``xq[row, 4 kq : 4 kq + 4]``."""

    @T.macro
    def dot(acc, i, q, jo, kq, col0, xq, row):
        if vnni:
            for v in T.unroll(HALF // LANES):
                acc[i, T.ramp(v * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                    "int32x16", VNNI, acc[i, T.ramp(v * LANES, 1, LANES)],
                    T.reinterpret("int8x64", q[jo, kq, T.ramp(col0 + v * LANES, 1, LANES)]),
                    T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", xq[row, T.ramp(kq * 4, 1, 4)]),
                                                         LANES)))
        else:
            for r in T.unroll(4):
                for j in T.vectorized(HALF):
                    acc[i, j] = acc[i, j] + T.Cast("int32", xq[row, kq * 4 + r]) * T.Cast("int32", T.bitwise_and(
                        T.shift_right(q[jo, kq, col0 + j], T.Cast("uint32", r * 8)), T.uint32(255)))

    return dot


def _tile(n: int, k: int, has_bias: bool, vnni: bool):
    """A macro computing the ``rows x 64`` output tile at ``row0``, N block ``jo``, and storing it:
    ``y = f32(acc - 128 * xsum) * (xs * ws) (+ b)``, guarded per element when N % 64 != 0."""
    dot, guarded, k4 = _dot(vnni), n % BLOCK_N != 0, -(-k // 4)

    @T.macro
    def store(y, b, acc, xs, xsum, ws, i, j, row, col0):
        if has_bias:
            y[row, col0 + j] = T.Cast("float32", acc[i, j] - 128 * xsum[row]) * (xs[row] * ws[col0 + j]) + b[col0 + j]
        else:
            y[row, col0 + j] = T.Cast("float32", acc[i, j] - 128 * xsum[row]) * (xs[row] * ws[col0 + j])

    @T.macro
    def store_half(y, b, acc, xs, xsum, ws, i, row, col0):
        if guarded:
            for j in range(HALF):
                if col0 + j < n:
                    store(y, b, acc, xs, xsum, ws, i, j, row, col0)
        else:
            for j in T.vectorized(HALF):
                store(y, b, acc, xs, xsum, ws, i, j, row, col0)

    @T.macro
    def tile(xq, xs, xsum, q, ws, b, y, jo, row0, rows):
        lo = T.alloc_buffer((rows, HALF), "int32", scope="global")
        hi = T.alloc_buffer((rows, HALF), "int32", scope="global")
        for i in T.unroll(rows):
            for j in T.vectorized(HALF):
                lo[i, j] = 0
            for j in T.vectorized(HALF):
                hi[i, j] = 0
        for kq in range(k4):
            for i in T.unroll(rows):
                dot(lo, i, q, jo, kq, 0, xq, row0 + i)
                dot(hi, i, q, jo, kq, HALF, xq, row0 + i)
        for i in T.unroll(rows):
            store_half(y, b, lo, xs, xsum, ws, i, row0 + i, jo * BLOCK_N)
            store_half(y, b, hi, xs, xsum, ws, i, row0 + i, jo * BLOCK_N + HALF)

    return tile


def _without_bias(func: tirx.PrimFunc, has_bias: bool) -> tirx.PrimFunc:
    """The kernels are written with a bias parameter; drop it when there is none (never read then)."""
    if has_bias:
        return func
    return tirx.PrimFunc([p for p in func.params if p.name != "b"], func.body, func.ret_type, func.attrs)


@cache  # a model asks for the same few shapes many times; TVMScript parsing is slow
def make_w8a8_gemv(n: int, k: int, scale_count: int, has_bias: bool, vnni: bool) -> tirx.PrimFunc:
    """The M == 1 kernel: quantize x, then one 1 x 64 tile per N block, in parallel."""
    nblocks, k4 = -(-n // BLOCK_N), -(-k // 4)
    quantize_row, tile = _quantize_row(k), _tile(n, k, has_bias, vnni)

    @T.prim_func(private=True)
    def gemv(
        x: T.Buffer((1, k), "float32"),
        q: T.Buffer((nblocks, k4, BLOCK_N), "uint32"),
        ws: T.Buffer((scale_count,), "float32"),
        b: T.Buffer((n,), "float32"),
        y: T.Buffer((1, n), "float32"),
    ):
        T.func_attr(_kernel_attrs())
        xq = T.alloc_buffer((1, k4 * 4), "int8", scope="global")
        xs = T.alloc_buffer((1,), "float32", scope="global")
        xsum = T.alloc_buffer((1,), "int32", scope="global")
        quantize_row(x, xq, xs, xsum, 0)
        for jo in T.parallel(nblocks):
            tile(xq, xs, xsum, q, ws, b, y, jo, 0, 1)

    return _without_bias(gemv, has_bias)


@cache
def make_w8a8_gemm(n: int, k: int, scale_count: int, has_bias: bool, vnni: bool, threads: int = 1,
                   rows: int = GEMM_ROWS) -> tirx.PrimFunc:
    """The kernel for symbolic M: quantize the rows in parallel, then ``rows x 64`` register tiles
    per (N block, row part) task (see the module docstring and cpu_linear.make_gemm)."""
    assert 1 <= rows <= 7, "the remainder tiles (4, 2, 1 rows) cover at most 7 rows"
    nblocks, k4, mr, parts = -(-n // BLOCK_N), -(-k // 4), rows, threads
    quantize_row, tile = _quantize_row(k), _tile(n, k, has_bias, vnni)

    @T.macro
    def panel_part(xq, xs, xsum, q, ws, b, y, m, jo, part):
        for mo in range(part * (m // mr) // parts, (part + 1) * (m // mr) // parts):
            tile(xq, xs, xsum, q, ws, b, y, jo, mo * mr, mr)
        if part == parts - 1:  # the m % mr remainder rows as tiles of 4, 2, 1 rows
            if m % mr // 4 % 2 == 1:
                tile(xq, xs, xsum, q, ws, b, y, jo, m // mr * mr, 4)
            if m % mr // 2 % 2 == 1:
                tile(xq, xs, xsum, q, ws, b, y, jo, m // mr * mr + m % mr // 4 * 4, 2)
            if m % mr % 2 == 1:
                tile(xq, xs, xsum, q, ws, b, y, jo, m // mr * mr + m % mr // 2 * 2, 1)

    @T.prim_func(private=True)
    def gemm(
        var_x: T.handle,
        q: T.Buffer((nblocks, k4, BLOCK_N), "uint32"),
        ws: T.Buffer((scale_count,), "float32"),
        b: T.Buffer((n,), "float32"),
        var_y: T.handle,
    ):
        T.func_attr(_kernel_attrs())
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        xq = T.alloc_buffer((m, k4 * 4), "int8", scope="global")
        xs = T.alloc_buffer((m,), "float32", scope="global")
        xsum = T.alloc_buffer((m,), "int32", scope="global")
        for r in T.parallel(m):
            quantize_row(x, xq, xs, xsum, r)
        for task in T.parallel(nblocks * parts):
            panel_part(xq, xs, xsum, q, ws, b, y, m, task // parts, task % parts)

    return _without_bias(gemm, has_bias)
