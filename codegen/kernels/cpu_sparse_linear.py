"""CPU kernels for ``linear(x, densify(values, indices))``: N:M-sparse weights read as stored.

Storage (ir/sparse_format.py, kept in the IR's row-major layout): ``values`` f32 ``[N, C]`` with
``C = K*n/m`` and ``indices`` u32, each value's position in its group of ``m`` inputs, packed
``32 // bits`` to a word.

GEMV (decode, M == 1)
---------------------
Covered (:func:`supports`): ``m == 2n`` (1:2, 2:4, 4:8), ``C`` a multiple of 16, x86 with AVX-512.
Parallel over output rows; a row is one contiguous stream of values (and one of index words),
read once, the dense weight never built. Per chunk of 16 values (16/n groups, i.e. 32 inputs of
``x``, since ``m == 2n``)::

    lane l:  p   = (index word >> shift[l]) & (2**bits - 1)     position in its group
             src = (l // n) * m + p                              which of the chunk's 32 inputs
             acc += values[r, 16t + l] * x[32t + src]

the gather of ``x`` being one ``vpermi2var`` (``vpermt2ps``) over the chunk's 32 inputs held in two
registers. Lane constants (which index word of the chunk, shift, group base) come from a small
table argument. Chunks alternate between two accumulators (independent FMA chains); a row ends
with one horizontal sum (+ bias). Per chunk (32 weights): 2 f32 loads of x (L1), 1 load of values,
a broadcast, a shift, an AND, an add, the permute and an FMA, over ``16 * (4 + bits/8)`` bytes of
weight stream (68 for 2:4) instead of dense f32's 128.

Prefill (any M)
---------------
Not a sparse kernel: the weight is densified into a temporary in the dense CPU kernels' blocked
layout (cpu_linear.WEIGHT_LAYOUT) by one TE compute, then cpu_linear's GEMM runs on it. The
temporary costs one write of the dense f32 weight per prefill call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cache

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...ir.sparse_format import NMFormat
from .cpu_linear import BLOCK_N, _kernel_attrs, _product, _static_or_symbolic_shape, emit_linear
from .sparse_te import densified_value

LANES = 16
"""f32 lanes of an AVX-512 register: values per chunk."""

PARTIAL_SUMS = 2
"""Accumulators per row: chunks alternate between them."""


def supports(fmt: NMFormat, out_features: int, in_features: int, target: tvm.target.Target | None) -> bool:
    """Whether the GEMV computes ``fmt`` for ``[out_features, in_features]`` weights on ``target``."""
    if target is None or target.kind.name != "llvm" or not fmt.fits(in_features):
        return False
    if fmt.m != 2 * fmt.n or LANES % fmt.n or fmt.kept(in_features) % LANES or fmt.bits > 4:
        return False
    return bool(tvm.target.codegen.target_has_features("avx512f", target))


@dataclass(frozen=True)
class SparseShape:
    """What a kernel is specialized on (hashable: built once per shape)."""

    n_out: int
    k: int
    n: int
    m: int
    has_bias: bool

    @property
    def fmt(self) -> NMFormat:
        return NMFormat(self.n, self.m)

    @property
    def tag(self) -> str:
        return f"{self.n}of{self.m}_n{self.n_out}_k{self.k}{'_bias' if self.has_bias else ''}"


def lane_table(fmt: NMFormat) -> np.ndarray:
    """int32 ``[3, 16]``, per lane of a chunk: the index word it reads (0 or 1, relative to the
    chunk's first), its shift in that word, and the first of the chunk's inputs of its group."""
    lanes = np.arange(LANES)  # lane l holds value 16t + l; 16t is a multiple of per_word or of 16
    word, shift = lanes // fmt.per_word, lanes % fmt.per_word * fmt.bits
    return np.stack([word, shift, lanes // fmt.n * fmt.m]).astype(np.int32)


def _vector(buffer, row: int) -> tirx.PrimExpr:
    return buffer[row, tirx.Ramp(0, 1, LANES)]


@cache
def make_sparse_gemv(shape: SparseShape) -> tirx.PrimFunc:
    """The M == 1 kernel (see the module docstring)."""
    fmt, k, rows = shape.fmt, shape.k, shape.n_out
    kept, words, per_word, bits = fmt.kept(k), fmt.index_words(k), fmt.per_word, fmt.bits
    chunks = kept // LANES
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            x = T.arg("x", T.buffer((1, k), "float32"))
            values = T.arg("values", T.buffer((rows, kept), "float32"))
            indices = T.arg("indices", T.buffer((rows, words), "uint32"))
            table = T.arg("lanes", T.buffer((3, LANES), "int32"))
            bias = T.arg("b", T.buffer((rows,), "float32")) if shape.has_bias else None
            y = T.arg("y", T.buffer((1, rows), "float32"))
            with T.parallel(0, rows) as r:
                acc = T.alloc_buffer((PARTIAL_SUMS, LANES), "float32", scope="global")
                for p in range(PARTIAL_SUMS):
                    T.buffer_store(acc, tirx.Broadcast(tirx.const(0, "float32"), LANES), [p, tirx.Ramp(0, 1, LANES)])

                def chunk(t, p: int) -> None:
                    first = t * LANES  # first value of the chunk
                    word0 = tirx.floordiv(first, per_word)
                    word = tirx.Broadcast(indices[r, word0], LANES)
                    if per_word < LANES:  # the chunk spans LANES // per_word words (4-bit indices: two)
                        word = tirx.Select(_vector(table, 0) == tirx.Broadcast(tirx.const(0, "int32"), LANES), word,
                                           tirx.Broadcast(indices[r, word0 + 1], LANES))
                    shift = _vector(table, 1)
                    if per_word > LANES:  # several chunks share a word (1-bit indices)
                        shift = shift + tirx.Broadcast(tirx.Cast("int32", tirx.floormod(first, per_word) * bits),
                                                       LANES)
                    position = tirx.bitwise_and(tirx.shift_right(word, tirx.Cast(f"uint32x{LANES}", shift)),
                                                tirx.Broadcast(tirx.const(2 ** bits - 1, "uint32"), LANES))
                    source = tirx.Cast(f"int32x{LANES}", position) + _vector(table, 2)
                    base = t * 2 * LANES  # the chunk's 32 inputs: x[base ...]
                    gathered = tirx.call_llvm_pure_intrin(
                        f"float32x{LANES}", "llvm.x86.avx512.vpermi2var.ps.512",
                        x[0, tirx.Ramp(base, 1, LANES)], source, x[0, tirx.Ramp(base + LANES, 1, LANES)])
                    lanes = tirx.Ramp(0, 1, LANES)
                    T.buffer_store(acc, acc[p, lanes] + values[r, tirx.Ramp(first, 1, LANES)] * gathered, [p, lanes])

                with T.serial(0, chunks // PARTIAL_SUMS) as pair:
                    for p in range(PARTIAL_SUMS):
                        chunk(pair * PARTIAL_SUMS + p, p)
                for p in range(chunks % PARTIAL_SUMS):
                    chunk(chunks // PARTIAL_SUMS * PARTIAL_SUMS + p, p)
                terms = [acc[p, lane] for p in range(PARTIAL_SUMS) for lane in range(LANES)]
                while len(terms) > 1:  # a pairwise tree: short dependency chains
                    terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                             for i in range(0, len(terms), 2)]
                total = terms[0] + bias[r] if bias is not None else terms[0]
                T.buffer_store(y, total, [0, r])
    return builder.get()


def densify_blocked_te(values: te.Tensor, indices: te.Tensor, *, fmt: NMFormat, out_features: int,
                       in_features: int) -> te.Tensor:
    """The densified weight in cpu_linear's blocked layout: ``[ceil(N/64), K, 64]``,
    ``stored[i, k, j] = densify(...)[64*i + j, k]``, zero past N."""
    value = densified_value(fmt, values, indices)

    def blocked(i, k, j):
        row = i * BLOCK_N + j
        inside = row < out_features
        return tirx.Select(inside, value(tirx.min(row, out_features - 1), k), tirx.const(0, "float32"))

    return te.compute((-(-out_features // BLOCK_N), in_features, BLOCK_N), blocked, name="densify_blocked")


def emit_sparse_linear(bb: relax.BlockBuilder, x: relax.Expr, values: relax.Expr, indices: relax.Expr,
                       bias: relax.Expr | None, *, fmt: NMFormat, out_features: int, in_features: int,
                       target: tvm.target.Target) -> relax.Expr:
    """Emit ``y = x @ densify(values, indices)^T + bias``; x f32 ``[..., K]``. A constant M of 1 runs
    the sparse GEMV (which needs :func:`supports`), anything else densifies into a temporary and
    runs cpu_linear's GEMM."""
    x_shape = _static_or_symbolic_shape(x)
    rows = _product(x_shape[:-1])
    if not (isinstance(rows, int) and rows == 1):
        # emit_te passes only TVM values on: the format goes in through partial
        compute = functools.partial(densify_blocked_te, fmt=fmt, out_features=out_features, in_features=in_features)
        dense = bb.emit_te(compute, values, indices, primfunc_name_hint="densify_blocked")
        return emit_linear(bb, x, dense, bias, target, out_features=out_features)
    if not supports(fmt, out_features, in_features, target):
        raise ValueError(f"sparse GEMV: {fmt.n}:{fmt.m} [{out_features}, {in_features}] is not supported on {target}")
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [1, in_features]))
    shape = SparseShape(out_features, in_features, fmt.n, fmt.m, bias is not None)
    gv = bb.add_func(make_sparse_gemv(shape), f"sparse_linear_gemv_{shape.tag}")
    args = [x2d, values, indices, relax.const(lane_table(fmt))] + ([bias] if bias is not None else [])
    y2d = bb.emit(relax.call_tir(gv, args, relax.TensorType([1, out_features], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [out_features]))
