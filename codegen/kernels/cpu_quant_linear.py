"""Hand-scheduled CPU kernels for ``linear(x, dequantize(packed, scales[, zeros]))``, dequantize fused.

They compute :func:`quant_linear_te.quant_linear_te` (the target-independent definition) without
ever storing the f32 weight: it only exists in registers (GEMV) or in one cache-resident panel
(GEMM). Covered (:func:`supports`): integer schemes whose groups hold whole u32 words (8-, 4-,
2-bit codes; any group that is a multiple of ``32 // bits``, or one group per row; a short last
group too, when ``K`` is a multiple of ``32 // bits``), and 4-bit codebook schemes (NF4) on x86
CPUs with AVX-512. Others (3-bit codes in groups of 128, FP8) keep the generic dequantize. The
accumulator blocking below is x86's; aarch64 keeps fewer rows and partial sums (``cpu_isa.NEON``).

Weight layout
-------------
The parts are stored in the fp32 kernels' block layout (cpu_linear.WEIGHT_LAYOUT), applied to their
own ``[N, columns]`` arrays: rows cut into blocks of ``BLOCK_N = 64`` output channels, each block
stored column-major::

    q[nb, w, j] = packed[nb * 64 + j, w]      u32, words of 32 // bits codes
    s[nb, g, j] = scales[nb * 64 + j, g]      f32 (zeros likewise)

zero-padded past N (a padded row has scale 0, so it adds nothing). One 64-byte vector load of
``q`` holds word ``w`` of 16 rows, i.e. ``32 // bits`` codes of each of 16 output channels; the
artifact holds exactly the packed codes and scales, rearranged (no f32 weights).

GEMV (decode, M == 1)
---------------------
Parallel over N blocks; each block's codes are one contiguous stream read once. Per group ``g``
of input features, with ``xsum[g] = sum_k x[k]`` computed once per call (the loops over groups
run over the ``K // group`` full groups, then once more over a short last group's fewer words)::

    y[n] += s[n, g] * (sum_k x[k] * level[n, k]  -  zero[n, g] * xsum[g])

which equals ``sum_k x[k] * (level[n, k] - zero[n, g]) * s[n, g]`` (integer schemes: ``level`` is
the code, ``zero`` the zero point or ``2**(bits-1)``; codebook schemes: ``level`` is the codebook
entry, no zero). Integer codes cost, per 16 of them, one AND with the code's mask *in place*, one
conversion to f32 and one FMA: code ``i`` of a word comes out multiplied by ``2**(i * bits)``, so
``x`` is pre-scaled by ``2**(-i * bits)`` (both exact). Codebook codes cost a shift and one
``vpermps`` (the 16 levels live in one register) before the FMA. Codes at even and odd positions
of a word go to two partial sums, so FMA chains are independent; scales are read once per group.
(Rounding differs from dequantize-then-multiply by a few ulps of the group's partial sums.)

GEMM (prefill, any M)
---------------------
Per (N block, row part) task: dequantize the block's ``K x 64`` panel into a f32 buffer (``K*256``
bytes, L2-resident; exactly the fp32 kernel's weight panel), then run the fp32 kernel's register
tile over it (``GEMM_ROWS x 64`` accumulators, one weight row load per k reused by every row).
The dequantization costs ``K * 64`` elements per task, amortized over the rows.

The kernels are built with TVM's IR builder (plain Python emitting TIR, no TVMScript parsing:
macro expansion in the TVMScript parser inspects the Python stack and costs seconds per kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...ir.quant_schemes import Scheme
from .cpu_linear import (
    BLOCK_N,
    GEMM_ROWS,
    HALF,
    WEIGHT_LAYOUT,
    PackedWeightLayout,
    _kernel_attrs,
    _product,
    _static_or_symbolic_shape,
    _target_threads,
)
from .cpu_isa import vector_unit

PARTIAL_SUMS = 2
"""Partial sums per output vector in the GEMV on x86: codes at even and odd positions of a word
(aarch64: cpu_isa.NEON's 1, its 64 columns already being 16 registers)."""

LANES = 16
"""f32 lanes of an AVX-512 register (the codebook kernels' explicit vectors)."""

LINE_WORDS = 16
"""u32 words (or f32 values) per 64-byte cache line."""

PREFETCH_WORDS = 16
"""How far ahead the GEMV prefetches its codes: 16 words of a block = 4 KiB."""


@dataclass(frozen=True)
class BlockedLayout(PackedWeightLayout):
    """cpu_linear's weight layout, described for every array the CPU target stores in it."""

    @property
    def description(self) -> str:
        b = self.block
        return (f"[ceil(N/{b}), C, {b}]: stored[i, c, j] = A[{b}*i + j, c], zero-padded, for each packed "
                f"[N, C] array A (f32 linear weights; u32 codes, f32 scales and zeros of quantized linears)")


STORED_LAYOUT = BlockedLayout(block=BLOCK_N)
"""How the CPU target stores linear weights and the parts of fused quantized linears."""


def supports(scheme: Scheme, out_features: int, in_features: int, target: tvm.target.Target) -> bool:
    """Whether these kernels compute ``scheme`` for ``[out_features, in_features]`` weights on
    ``target``: groups of whole words (a short last group included), and integer levels or 16
    codebook levels with AVX-512."""
    per_word = scheme.codes_per_word
    if not scheme.supports(in_features) or scheme.group_of(in_features) % per_word or in_features % per_word:
        return False
    if scheme.codebook is None:
        return True
    return scheme.bits == 4 and bool(tvm.target.codegen.target_has_features("avx512f", target))


def group_runs(k: int, group: int, unit: int = 1) -> tuple[tuple[int, int, int], ...]:
    """(first group, groups, ``unit``s per group) of a row of ``k`` features in groups of ``group``:
    the full groups, then a short last group; the loops over groups run once per entry, with the
    same body. ``unit``: features per counted item (e.g. codes per u32 word)."""
    full, tail = k // group, k % group // unit
    return tuple(run for run in ((0, full, group // unit), (full, 1, tail)) if run[1] and run[2])


@dataclass(frozen=True)
class QuantShape:
    """Everything a kernel is specialized on (hashable: kernels are built once per shape)."""

    n: int
    k: int
    bits: int
    group: int  # input features per scale
    has_zeros: bool
    has_bias: bool
    codebook: bool  # levels from a 16-entry table operand instead of the codes themselves

    @property
    def tag(self) -> str:
        """A name fragment, e.g. ``q4g128_n576_k1536_zeros_bias``."""
        return (f"{'cb' if self.codebook else 'q'}{self.bits}g{self.group}_n{self.n}_k{self.k}"
                f"{'_zeros' if self.has_zeros else ''}{'_bias' if self.has_bias else ''}")

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def words(self) -> int:
        return self.k // self.per_word

    @property
    def words_per_group(self) -> int:
        """Words of a full group."""
        return self.group // self.per_word

    @property
    def groups(self) -> int:
        """Groups per row, a short last one included."""
        return -(-self.k // self.group)

    @property
    def group_runs(self) -> tuple[tuple[int, int, int], ...]:
        """(first group, groups, words per group): ``group_runs`` in u32 words."""
        return group_runs(self.k, self.group, self.per_word)

    @property
    def nblocks(self) -> int:
        return -(-self.n // BLOCK_N)


def emit_quant_linear(bb: relax.BlockBuilder, x: relax.Expr, packed: relax.Expr, scales: relax.Expr,
                      zeros: relax.Expr | None, bias: relax.Expr | None, *, scheme: Scheme,
                      out_features: int, in_features: int, target: tvm.target.Target) -> relax.Expr:
    """Emit ``y = x @ dequantize(packed, scales, zeros)^T + bias``; x f32 ``[..., K]``.

    The parts are either in the blocked layout (3-D, as stored) or in the IR's ``[N, columns]``
    layout, which is then blocked inside the graph (a per-call copy: store them blocked).
    A constant M of 1 selects the GEMV, anything else the GEMM.
    """
    if not supports(scheme, out_features, in_features, target):
        raise ValueError(f"cpu quant linear: {scheme.name} on [{out_features}, {in_features}] is not supported")
    x_shape = _static_or_symbolic_shape(x)
    n, k = out_features, in_features
    if int(x_shape[-1]) != k:
        raise ValueError(f"quant linear: x has K={x_shape[-1]}, the weight {k}")
    parts = [_blocked(bb, part) for part in (packed, scales, zeros) if part is not None]
    if scheme.codebook is not None:
        parts.append(relax.const(np.asarray(scheme.codebook, np.float32)))
    rows = _product(x_shape[:-1])
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [rows, k]))
    shape = QuantShape(n, k, scheme.bits, scheme.group_of(k), zeros is not None, bias is not None,
                       scheme.codebook is not None)
    unit = vector_unit(target)
    if isinstance(rows, int) and rows == 1:
        kind, func = "gemv", make_quant_gemv(shape, unit.quant_partial_sums)
    else:
        kind, func = "gemm", make_quant_gemm(shape, _target_threads(target), unit.gemm_rows)
    gv = bb.add_func(func, f"quant_linear_{kind}_{shape.tag}")
    args = [x2d, *parts] + ([bias] if bias is not None else [])
    y2d = bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, n], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [n]))


def _blocked(bb: relax.BlockBuilder, part: relax.Expr) -> relax.Expr:
    """A part in the blocked layout: as is when stored so, else blocked in the graph."""
    if len(part.ty.shape.values) == 3:
        return part
    return bb.emit_te(WEIGHT_LAYOUT.pack_te, part, primfunc_name_hint="block_quant_weight")


# ---- building blocks ---------------------------------------------------------------------------

def _prefetch(element: tirx.PrimExpr) -> None:
    """Software prefetch into L2 (``prefetcht1``) of the line holding a buffer element."""
    T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(element), 0, 2, 1))


class _Tile:
    """``rows x BLOCK_N`` f32 accumulators, as two ``rows x HALF`` buffers declared where the tile
    is used. Small "global"-scope buffers become stack allocas, which LLVM keeps in registers
    (see cpu_linear: a heap tile, or one over 1 KiB, round-trips through memory)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.halves = [T.alloc_buffer((rows, HALF), "float32", scope="global") for _ in range(2)]

    def zero(self) -> None:
        for half in self.halves:
            for i in range(self.rows):
                with T.vectorized(0, HALF) as j:
                    T.buffer_store(half, tirx.const(0, "float32"), [i, j])

    def at(self, i: int, col) -> tirx.PrimExpr:
        """Accumulator ``[i, col]`` of a column ``h * HALF + j`` given as ``col = (h, j)``."""
        h, j = col
        return self.halves[h][i, j]

    def add(self, i: int, value) -> None:
        """Row ``i`` += ``value((h, j))`` for every column ``h * HALF + j`` (vectorized)."""
        for h, half in enumerate(self.halves):
            with T.vectorized(0, HALF) as j:
                T.buffer_store(half, half[i, j] + value((h, j)), [i, j])

    def add_vectors(self, i: int, value) -> None:
        """Row ``i`` += ``value(col0)``, an explicit ``LANES``-wide vector of columns ``col0...``."""
        for h, half in enumerate(self.halves):
            for v in range(0, HALF, LANES):
                lanes = tirx.Ramp(v, 1, LANES)
                T.buffer_store(half, half[i, lanes] + value(h * HALF + v), [i, lanes])

    def store(self, i: int, y: tirx.Buffer, row, jo, n: int, bias: tirx.Buffer | None) -> None:
        """``y[row, block jo] = row i (+ bias)``; element-guarded when the last block is partial."""
        for h, half in enumerate(self.halves):
            col0 = jo * BLOCK_N + h * HALF

            def value(j):
                return half[i, j] + bias[col0 + j] if bias is not None else half[i, j]

            if n % BLOCK_N == 0:
                with T.vectorized(0, HALF) as j:
                    T.buffer_store(y, value(j), [row, col0 + j])
                continue
            with T.serial(0, HALF) as j:
                with T.If(col0 + j < n):
                    with T.Then():
                        T.buffer_store(y, value(j), [row, col0 + j])


class _Levels:
    """The parameters holding the quantized weight (q, s[, z][, codebook]) and the level
    expressions read from them."""

    def __init__(self, shape: QuantShape):
        self.shape = shape
        blocks, groups, bits = shape.nblocks, shape.groups, shape.bits
        self.q = T.arg("q", T.buffer((blocks, shape.words, BLOCK_N), "uint32"))
        self.s = T.arg("s", T.buffer((blocks, groups, BLOCK_N), "float32"))
        self.z = T.arg("z", T.buffer((blocks, groups, BLOCK_N), "float32")) if shape.has_zeros else None
        self.table = T.arg("codebook", T.buffer((2 ** bits,), "float32")) if shape.codebook else None
        self.mask = 2 ** bits - 1

    def code(self, jo, w, col, i: int) -> tirx.PrimExpr:
        """Code ``i`` of word ``w`` of column ``col`` of block ``jo``, as f32."""
        word, bits = self.q[jo, w, col], self.shape.bits
        shifted = tirx.shift_right(word, tirx.const(i * bits, "uint32")) if i else word
        return tirx.Cast("float32", tirx.bitwise_and(shifted, tirx.const(self.mask, "uint32")))

    def code_in_place(self, jo, w, col, i: int) -> tirx.PrimExpr:
        """Code ``i`` of word ``w`` times ``2**(i * bits)``, as f32: the code masked where it sits
        (exact: a ``bits``-bit integer times a power of two). One instruction less than ``code``."""
        mask = tirx.const(self.mask << (i * self.shape.bits), "uint32")
        return tirx.Cast("float32", tirx.bitwise_and(self.q[jo, w, col], mask))

    def codebook_vector(self, jo, w, col0, i: int) -> tirx.PrimExpr:
        """Codebook levels of code ``i`` of word ``w``, columns ``col0 ... col0 + LANES - 1``: one
        AVX-512 ``vpermps`` picks each lane's level from the 16-entry table by its low 4 bits."""
        word = self.q[jo, w, tirx.Ramp(col0, 1, LANES)]
        shift = tirx.Broadcast(tirx.const(i * self.shape.bits, "uint32"), LANES)
        index = tirx.reinterpret(f"int32x{LANES}", tirx.shift_right(word, shift) if i else word)
        table = self.table[tirx.Ramp(0, 1, LANES)]
        return tirx.call_llvm_pure_intrin(f"float32x{LANES}", "llvm.x86.avx512.permvar.sf.512", table, index)

    def prefetch_ahead(self, jo, w) -> None:
        """Software-prefetch the codes ``PREFETCH_WORDS`` words past word ``w`` of block ``jo`` (into
        the next block near the end of this one), and the scales of that word's group. The GEMV
        consumes its stream slower than memory delivers it, and without these the hardware
        prefetchers leave it waiting on DRAM (streaming int4 weights from memory: 8 GB/s without,
        11-12 GB/s with, of a measured 15-17)."""
        shape = self.shape
        ahead = jo * shape.words + w + PREFETCH_WORDS
        block, word = tirx.min(ahead // shape.words, shape.nblocks - 1), ahead % shape.words
        for line in range(0, BLOCK_N, LINE_WORDS):
            _prefetch(self.q[block, word, line])
        group = word // shape.words_per_group
        with T.If(word % shape.words_per_group == 0):
            with T.Then():
                for line in range(0, BLOCK_N, LINE_WORDS):
                    _prefetch(self.s[block, group, line])
                    if self.z is not None:
                        _prefetch(self.z[block, group, line])

    def zero(self, jo, g, col) -> tirx.PrimExpr | None:
        """The level offset of column ``col`` in group ``g``: zero point, symmetric offset, or
        None (codebook levels are the values)."""
        if self.shape.codebook:
            return None
        return self.z[jo, g, col] if self.z is not None else tirx.const(2 ** (self.shape.bits - 1), "float32")


# ---- kernels -----------------------------------------------------------------------------------

@cache  # a model asks for the same few shapes many times
def make_quant_gemv(shape: QuantShape, partial_sums: int = PARTIAL_SUMS) -> tirx.PrimFunc:
    """The M == 1 kernel (see the module docstring): per N block, per group, ``partial_sums``
    partial sums of ``x[k] * level`` over the group's words, then ``y += s * (sum - zero * xsum[g])``."""
    n, k, group, per_word = shape.n, shape.k, shape.group, shape.per_word
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            x = T.arg("x", T.buffer((1, k), "float32"))
            levels = _Levels(shape)
            bias = T.arg("b", T.buffer((n,), "float32")) if shape.has_bias else None
            y = T.arg("y", T.buffer((1, n), "float32"))
            if not shape.codebook:  # per group sum_k x[k]; x[k] * 2**(-bits * (k % per_word)) for code_in_place
                xsum = T.alloc_buffer((shape.groups,), "float32", scope="global")
                for first, count, words in shape.group_runs:
                    with T.serial(0, count) as gi:
                        g = first + gi
                        T.buffer_store(xsum, tirx.const(0, "float32"), [g])
                        with T.serial(0, words * per_word) as kk:
                            T.buffer_store(xsum, xsum[g] + x[0, g * group + kk], [g])
                x_scaled = T.alloc_buffer((k,), "float32", scope="global")
                with T.serial(0, shape.words) as w:
                    for i in range(per_word):
                        scale = tirx.const(2.0 ** (-shape.bits * i), "float32")
                        T.buffer_store(x_scaled, x[0, w * per_word + i] * scale, [w * per_word + i])
            with T.parallel(0, shape.nblocks) as jo:
                out, partial = _Tile(1), _Tile(partial_sums)
                out.zero()
                for first, count, words in shape.group_runs:
                    with T.serial(0, count) as gi:
                        g = first + gi
                        partial.zero()
                        with T.serial(0, words) as wg:
                            w = g * shape.words_per_group + wg
                            levels.prefetch_ahead(jo, w)
                            for i in range(per_word):
                                if shape.codebook:
                                    xk = tirx.Broadcast(x[0, w * per_word + i], LANES)
                                    partial.add_vectors(i % partial_sums, lambda col0, i=i, xk=xk:
                                                        xk * levels.codebook_vector(jo, w, col0, i))
                                else:
                                    xk = x_scaled[w * per_word + i]
                                    partial.add(i % partial_sums, lambda col, i=i, xk=xk:
                                                xk * levels.code_in_place(jo, w, col[0] * HALF + col[1], i))

                        def group_total(col):
                            total = partial.at(0, col)
                            for p in range(1, partial_sums):
                                total = total + partial.at(p, col)
                            zero = levels.zero(jo, g, col[0] * HALF + col[1])
                            total = total - zero * xsum[g] if zero is not None else total
                            return levels.s[jo, g, col[0] * HALF + col[1]] * total

                        out.add(0, group_total)
                out.store(0, y, 0, jo, n, bias)
    return builder.get()


@cache
def make_quant_gemm(shape: QuantShape, threads: int = 1, rows: int = GEMM_ROWS) -> tirx.PrimFunc:
    """The kernel for symbolic M (see the module docstring): per (N block, row part) task, the
    block's f32 panel is dequantized into a buffer, then ``rows x 64`` register tiles (and
    4-, 2-, 1-row tiles for the ``M % rows`` remainder) sweep it, as in cpu_linear.make_gemm.
    The parallel loop runs over (N block, row part) pairs, the full row tiles split into
    ``threads`` equal parts; parts without rows skip the dequantization."""
    assert 1 <= rows <= 7, "the remainder tiles (4, 2, 1 rows) cover at most 7 rows"
    n, k, per_word, mr, parts = shape.n, shape.k, shape.per_word, rows, threads
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            m = T.int64()
            x = T.match_buffer(T.arg("x", T.handle()), (m, k), "float32")
            levels = _Levels(shape)
            bias = T.arg("b", T.buffer((n,), "float32")) if shape.has_bias else None
            y = T.match_buffer(T.arg("y", T.handle()), (m, n), "float32")

            def dequantize_panel(panel, jo):
                for first, count, words in shape.group_runs:
                    with T.serial(0, count) as gi:
                        g = first + gi
                        with T.serial(0, words) as wg:
                            w = g * shape.words_per_group + wg
                            for i in range(per_word):
                                if shape.codebook:
                                    for col0 in range(0, BLOCK_N, LANES):
                                        lanes = tirx.Ramp(col0, 1, LANES)
                                        value = levels.codebook_vector(jo, w, col0, i) * levels.s[jo, g, lanes]
                                        T.buffer_store(panel, value, [w * per_word + i, lanes])
                                    continue
                                with T.vectorized(0, BLOCK_N) as j:
                                    level = levels.code(jo, w, j, i) - levels.zero(jo, g, j)
                                    T.buffer_store(panel, level * levels.s[jo, g, j], [w * per_word + i, j])

            def tile(panel, jo, row0, rows: int):
                acc = _Tile(rows)
                acc.zero()
                with T.serial(0, k) as kk:
                    for i in range(rows):
                        acc.add(i, lambda col, i=i: x[row0 + i, kk] * panel[kk, col[0] * HALF + col[1]])
                for i in range(rows):
                    acc.store(i, y, row0 + i, jo, n, bias)

            def when(condition, body):
                with T.If(condition):
                    with T.Then():
                        body()

            full = m // mr  # full row tiles
            with T.parallel(0, shape.nblocks * parts) as task:
                jo, part = task // parts, task % parts
                first, end, last = part * full // parts, (part + 1) * full // parts, part == parts - 1
                with T.If(tirx.Or(first < end, tirx.And(last, m % mr > 0))):
                    with T.Then():
                        panel = T.alloc_buffer((k, BLOCK_N), "float32", scope="global")
                        dequantize_panel(panel, jo)
                        with T.serial(first, end) as mo:
                            tile(panel, jo, mo * mr, mr)
                        # Remainder rows r = m % mr (< 8) as tiles of 4, 2, 1 rows: the t-row tile
                        # runs when bit t of r is set, at (r // 2t) * 2t rows past the full tiles.
                        rest = m % mr
                        for rows in (4, 2, 1):
                            when(tirx.And(last, rest // rows % 2 == 1),
                                 lambda rows=rows: tile(panel, jo, full * mr + rest // (2 * rows) * (2 * rows), rows))
    return builder.get()
