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

GEMM (prefill, M > 1)
---------------------
Covered (:func:`supports_gemm`): any format whose index words hold whole groups (``per_word % n
== 0``: 1:2, 2:4, 4:8 and every other ``m == 2n`` the GEMV covers), on llvm targets. Values and
indices are read as stored, once per group of 64 rows of x; the dense weight is never built and
only the kept weights are multiplied (half the dense GEMM's FMAs at 2:4). The problem is transposed
so that a vector runs over rows of x, not over inputs: x is first copied into blocks of 16 rows,
input-major (:func:`make_x_blocks`, ``xb[b, k, l] = x[16b + l, k]``, zero past M), so that 16
rows' values of one input are one aligned vector. Then per kept value ``v = values[r, c]``, of
input ``col = (c // n) * m + position``::

    acc[r, b] += broadcast(v) * xb[b, col, 0:16]        (one FMA per 16 rows, no gather)

A register tile (:data:`GEMM_TILES`) is ``blocks`` blocks of 16 rows x ``channels`` output channels,
at most 24 zmm accumulators, over all of K: per kept value one broadcast, ``blocks`` vector loads
(L1/L2) and ``blocks`` FMAs, the value's position decoded from its row's index word with a constant
shift (the ``per_word`` values of a word unrolled). Groups of 64 rows run 4 x 6 tiles, the last
group of M the largest tile it fills (3 x 8, 2 x 12, 1 x 6); rows past M are computed on zeros and
not stored. While a tile runs it prefetches the next tile's values and indices (contiguous rows)
into L2, spread over its index words: without it the short per-row streams stall on DRAM. The
parallel loop runs over (group of 64 rows, task of :data:`GEMM_TASK_CHANNELS` channels), channels
inner, so that a thread sweeps its channels over one L2-resident x group. Results leave a tile as
scalars (``y[16b + l, r]``, the tile being transposed), one store per output.

Short prompts: a lone block of at most 8 (4) rows runs 8- (4-)lane vectors, fewer padding lanes;
and M <= :data:`FEW_ROWS` runs no blocks at all but the GEMV's chunks (below: the chunk's x gathered
by one permute, per row of x), 4, 2 and 1 rows of x at a time, where the GEMV covers the format.

The x vectors are not reused across channels (each channel keeps other inputs), so the kernel is
bound by L1 loads (one 64-byte vector per FMA) and by the per-value decode, not by FMAs: on Zen 4 it
runs ~1.2-1.4x the dense GEMM at 64+ rows (4-block tiles: one broadcast per 4 FMAs), about level
with it at 16 rows, and slower below 16 rows (1.5x the dense time at M = 2, 1.3-1.8x at 4 to 8):
see bench/results/cpu_sparse_linear.md.

Fallback (:func:`emit_densified_linear`, for what the GEMM does not cover): the weight is densified
into a temporary in the dense kernels' blocked layout (cpu_linear.WEIGHT_LAYOUT), then
cpu_linear's GEMM runs on it: one write of the dense f32 weight per prefill call.
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


def _chunk_source(fmt: NMFormat, indices, table, r, t) -> tirx.PrimExpr:
    """int32x16: for each value of chunk ``t`` of row ``r``, which of the chunk's 32 inputs it reads."""
    per_word, bits = fmt.per_word, fmt.bits
    first = t * LANES  # first value of the chunk
    word0 = tirx.floordiv(first, per_word)
    word = tirx.Broadcast(indices[r, word0], LANES)
    if per_word < LANES:  # the chunk spans LANES // per_word words (4-bit indices: two)
        word = tirx.Select(_vector(table, 0) == tirx.Broadcast(tirx.const(0, "int32"), LANES), word,
                           tirx.Broadcast(indices[r, word0 + 1], LANES))
    shift = _vector(table, 1)
    if per_word > LANES:  # several chunks share a word (1-bit indices)
        shift = shift + tirx.Broadcast(tirx.Cast("int32", tirx.floormod(first, per_word) * bits), LANES)
    position = tirx.bitwise_and(tirx.shift_right(word, tirx.Cast(f"uint32x{LANES}", shift)),
                                tirx.Broadcast(tirx.const(2 ** bits - 1, "uint32"), LANES))
    return tirx.Cast(f"int32x{LANES}", position) + _vector(table, 2)


def _gather(x, row, t, source) -> tirx.PrimExpr:
    """f32x16: the inputs of row ``row`` of x that chunk ``t``'s values multiply (one vpermi2var over
    the chunk's 32 inputs)."""
    base = t * 2 * LANES
    return tirx.call_llvm_pure_intrin(f"float32x{LANES}", "llvm.x86.avx512.vpermi2var.ps.512",
                                      x[row, tirx.Ramp(base, 1, LANES)], source,
                                      x[row, tirx.Ramp(base + LANES, 1, LANES)])


@cache
def make_sparse_gemv(shape: SparseShape) -> tirx.PrimFunc:
    """The M == 1 kernel (see the module docstring)."""
    fmt, k, rows = shape.fmt, shape.k, shape.n_out
    kept, words = fmt.kept(k), fmt.index_words(k)
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
                    gathered = _gather(x, 0, t, _chunk_source(fmt, indices, table, r, t))
                    lanes = tirx.Ramp(0, 1, LANES)
                    T.buffer_store(acc, acc[p, lanes] + values[r, tirx.Ramp(t * LANES, 1, LANES)] * gathered, [p, lanes])

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


GEMM_TILES = ((4, 6), (3, 8), (2, 12), (1, 6))
"""GEMM register tiles, (blocks of ``LANES`` rows of x, output channels): at most 24 accumulators.
A group of 4 blocks (64 rows) runs the first, the last group of M the largest that it fills."""

FEW_ROWS = 4
"""Up to this M, formats the GEMV covers run its gathers (per row of x) rather than row blocks (on
Zen 4 the gathers cost ~27 us per row of a 1536 x 576 weight, a 16-row block ~150 us at any M)."""

NARROW = (8, 4)
"""Narrower vectors (ymm, xmm) for a lone block of at most 8 or 4 rows: fewer padding lanes."""

GEMM_TASK_CHANNELS = 24
"""Output channels per parallel task of the GEMM (a multiple of every tile's channels)."""


def gathers(fmt: NMFormat, in_features: int) -> bool:
    """Whether the GEMV's chunk gathers (:func:`_chunk_source`) apply: :func:`supports` but the target."""
    return (fmt.fits(in_features) and fmt.m == 2 * fmt.n and LANES % fmt.n == 0
            and fmt.kept(in_features) % LANES == 0 and fmt.bits <= 4)


def supports_gemm(fmt: NMFormat, out_features: int, in_features: int, target: tvm.target.Target | None) -> bool:
    """Whether the sparse GEMM computes ``fmt`` for ``[out_features, in_features]`` weights on ``target``."""
    if target is None or target.kind.name != "llvm" or not fmt.fits(in_features):
        return False
    return fmt.per_word % fmt.n == 0 and out_features > 0


@cache
def make_x_blocks(k: int) -> tirx.PrimFunc:
    """x ``[M, K]`` -> ``xb[ceil(M/16), K, 16]``, ``xb[b, k, l] = x[16b + l, k]``, zero past M."""
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            var_x, var_xb = T.arg("var_x", T.handle()), T.arg("var_xb", T.handle())
            m, blocks = tirx.Var("m", "int64"), tirx.Var("blocks", "int64")
            x = T.match_buffer(var_x, (m, k), "float32")
            xb = T.match_buffer(var_xb, (blocks, k, LANES), "float32")
            # in a root block: Relax's reshape-pattern analysis expects one in one-input functions
            with T.sblock("root"), T.parallel(0, blocks) as b:
                with T.If((b + 1) * LANES <= m):  # a full block: 16 row streams in, one out
                    with T.Then():
                        with T.serial(0, k) as kk:
                            for lane in range(LANES):
                                T.buffer_store(xb, x[b * LANES + lane, kk], [b, kk, lane])
                    with T.Else():
                        with T.serial(0, k) as kk:
                            for lane in range(LANES):
                                row = b * LANES + lane
                                T.buffer_store(xb, tirx.if_then_else(row < m, x[tirx.min(row, m - 1), kk],
                                                                     tirx.const(0, "float32")), [b, kk, lane])
    return builder.get()


@cache
def make_sparse_gemm(shape: SparseShape, tiles: tuple = GEMM_TILES, task_channels: int = GEMM_TASK_CHANNELS,
                     prefetch: bool = True, few_rows: int = FEW_ROWS) -> tirx.PrimFunc:
    """The M > 1 kernel on x in row blocks (:func:`make_x_blocks`; see the module docstring). Where
    :func:`gathers` (then the arguments are x, xb, values, indices, the lane table, bias, y), M of
    at most ``few_rows`` runs the GEMV's gathers instead, for 4, 2 and 1 rows at a time."""
    few = few_rows if gathers(shape.fmt, shape.k) else 0
    fmt, k, n_out = shape.fmt, shape.k, shape.n_out
    kept, words, per_word, bits = fmt.kept(k), fmt.index_words(k), fmt.per_word, fmt.bits
    full_words, tail = divmod(kept, per_word)
    columns_per_word = per_word // fmt.n * fmt.m
    mask = tirx.const(2 ** bits - 1, "uint32")
    tasks_per_group, group_blocks = -(-n_out // task_channels), tiles[0][0]
    assert all(task_channels % channels == 0 for _, channels in tiles)
    lanes = tirx.Ramp(0, 1, LANES)
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            var_x = T.arg("var_x", T.handle()) if few else None
            var_xb = T.arg("var_xb", T.handle())
            values = T.arg("values", T.buffer((n_out, kept), "float32"))
            indices = T.arg("indices", T.buffer((n_out, words), "uint32"))
            table = T.arg("lanes", T.buffer((3, LANES), "int32")) if few else None
            bias = T.arg("b", T.buffer((n_out,), "float32")) if shape.has_bias else None
            var_y = T.arg("var_y", T.handle())
            m, blocks = tirx.Var("m", "int64"), tirx.Var("blocks", "int64")
            x = T.match_buffer(var_x, (m, k), "float32") if few else None
            xb = T.match_buffer(var_xb, (blocks, k, LANES), "float32")
            y = T.match_buffer(var_y, (m, n_out), "float32")

            def gathered_rows(count: int, row0, r) -> None:
                """y[row0 + i, r] for i < count, the GEMV's chunks with x gathered per row."""
                acc = T.alloc_buffer((count * PARTIAL_SUMS, LANES), "float32", scope="global")
                vector = tirx.Ramp(0, 1, LANES)
                for a in range(count * PARTIAL_SUMS):
                    T.buffer_store(acc, tirx.Broadcast(tirx.const(0, "float32"), LANES), [a, vector])

                def chunk(t, p: int) -> None:
                    source = _chunk_source(fmt, indices, table, r, t)
                    v = values[r, tirx.Ramp(t * LANES, 1, LANES)]
                    for i in range(count):
                        a = i * PARTIAL_SUMS + p
                        T.buffer_store(acc, acc[a, vector] + v * _gather(x, row0 + i, t, source), [a, vector])

                chunks = kept // LANES
                with T.serial(0, chunks // PARTIAL_SUMS) as pair:
                    for p in range(PARTIAL_SUMS):
                        chunk(pair * PARTIAL_SUMS + p, p)
                for p in range(chunks % PARTIAL_SUMS):
                    chunk(chunks // PARTIAL_SUMS * PARTIAL_SUMS + p, p)
                for i in range(count):
                    terms = [acc[i * PARTIAL_SUMS + p, lane] for p in range(PARTIAL_SUMS) for lane in range(LANES)]
                    while len(terms) > 1:
                        terms = [terms[j] + terms[j + 1] if j + 1 < len(terms) else terms[j]
                                 for j in range(0, len(terms), 2)]
                    T.buffer_store(y, terms[0] + bias[r] if bias is not None else terms[0], [row0 + i, r])

            def tile(channels: int, count: int, row0, block0, width: int = LANES) -> None:
                """acc[b][r] over all of K for output channels row0 + r (r < channels) and x blocks
                block0 + b (b < count), then y; vectors of the first ``width`` rows of a block (a
                narrower one when a lone block holds no more rows)."""
                lanes = tirx.Ramp(0, 1, width)
                acc = [T.alloc_buffer((channels, width), "float32", scope="global") for _ in range(count)]
                for b in range(count):
                    for r in range(channels):
                        T.buffer_store(acc[b], tirx.Broadcast(tirx.const(0, "float32"), width), [r, lanes])

                def prefetch_next(buffer, columns: int, lines: int, step) -> None:
                    """Prefetch (into L2) ``lines`` cache lines, from line ``step * lines`` on, of the
                    next tile's rows of ``buffer`` (contiguous: ``channels * columns`` elements)."""
                    for q in range(lines):
                        flat = (row0 + channels) * columns + (step * lines + q) * (64 // 4)
                        row = tirx.min(tirx.floordiv(flat, columns), n_out - 1)
                        address = tirx.address_of(buffer[row, tirx.floormod(flat, columns)])
                        T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 2, 1))

                def word_step(w, used: int) -> None:  # the first `used` values of index word w
                    if prefetch and used == per_word and full_words:  # the next tile's weights, over the words
                        prefetch_next(values, kept, -(-channels * kept // 16 // full_words), w)
                        prefetch_next(indices, words, -(-channels * words // 16 // full_words), w)
                    word = [indices[row0 + r, w] for r in range(channels)]
                    for u in range(used):
                        for r in range(channels):
                            position = tirx.bitwise_and(tirx.shift_right(word[r], tirx.const(u * bits, "uint32")), mask)
                            col = w * columns_per_word + (u // fmt.n * fmt.m) + tirx.Cast("int32", position)
                            v = tirx.Broadcast(values[row0 + r, w * per_word + u], width)
                            for b in range(count):
                                T.buffer_store(acc[b], acc[b][r, lanes] + v * xb[block0 + b, col, lanes], [r, lanes])

                with T.serial(0, full_words) as w:
                    word_step(w, per_word)
                if tail:
                    word_step(full_words, tail)
                for b in range(count):
                    for r in range(channels):
                        for lane in range(width):  # constant indices only: the tile stays in registers
                            row = (block0 + b) * LANES + lane
                            total = acc[b][r, lane] + bias[row0 + r] if bias is not None else acc[b][r, lane]
                            if b == count - 1:  # only the last block of a tile can pass M
                                with T.If(row < m):
                                    with T.Then():
                                        T.buffer_store(y, total, [row, row0 + r])
                            else:
                                T.buffer_store(y, total, [row, row0 + r])

            def task_tiles(count: int, channels: int, block0, task, width: int = LANES) -> None:
                """The task's output channels (task_channels, fewer in the last task) in tiles."""
                def run(available: int) -> None:
                    if available // channels:
                        with T.serial(0, available // channels) as sub:
                            tile(channels, count, task * task_channels + sub * channels, block0, width)
                    if available % channels:
                        tile(available % channels, count, task * task_channels + available // channels * channels,
                             block0, width)

                last = n_out % task_channels
                if not last:
                    run(task_channels)
                    return
                with T.If(task < n_out // task_channels):
                    with T.Then():
                        run(task_channels)
                    with T.Else():
                        run(last)

            def few_rows_path() -> None:
                with T.parallel(0, n_out) as r:
                    with T.serial(0, m // 4) as quad:
                        gathered_rows(4, quad * 4, r)
                    with T.If(m % 4 // 2 == 1), T.Then():
                        gathered_rows(2, m // 4 * 4, r)
                    with T.If(m % 2 == 1), T.Then():
                        gathered_rows(1, m - 1, r)

            def row_blocks_path() -> None:
                groups = (blocks + group_blocks - 1) // group_blocks
                with T.parallel(0, groups * tasks_per_group) as job:
                    group, task = job // tasks_per_group, job % tasks_per_group
                    block0 = group * group_blocks
                    left = blocks - block0  # blocks of this group: group_blocks, or fewer in the last

                    def by_width(count: int, channels: int, width: int) -> None:  # a lone block: its rows
                        if width == NARROW[-1]:
                            task_tiles(count, channels, block0, task, width)
                            return
                        narrower = NARROW[NARROW.index(width) + 1] if width in NARROW else NARROW[0]
                        with T.If(m - block0 * LANES > narrower):
                            with T.Then():
                                task_tiles(count, channels, block0, task, width)
                            with T.Else():
                                by_width(count, channels, narrower)

                    def by_blocks(i: int) -> None:  # the largest tile that the group fills
                        count, channels = tiles[i]
                        if i == len(tiles) - 1:
                            by_width(count, channels, LANES)
                            return
                        with T.If(left >= count):
                            with T.Then():
                                task_tiles(count, channels, block0, task)
                            with T.Else():
                                by_blocks(i + 1)

                    by_blocks(0)

            if few:
                with T.If(m <= few):
                    with T.Then():
                        few_rows_path()
                    with T.Else():
                        row_blocks_path()
            else:
                row_blocks_path()
    return builder.get()


def emit_densified_linear(bb: relax.BlockBuilder, x: relax.Expr, values: relax.Expr, indices: relax.Expr,
                          bias: relax.Expr | None, *, fmt: NMFormat, out_features: int, in_features: int,
                          target: tvm.target.Target) -> relax.Expr:
    """The fallback: densify into a temporary in cpu_linear's blocked layout, then its kernels."""
    # emit_te passes only TVM values on: the format goes in through partial
    compute = functools.partial(densify_blocked_te, fmt=fmt, out_features=out_features, in_features=in_features)
    dense = bb.emit_te(compute, values, indices, primfunc_name_hint="densify_blocked")
    return emit_linear(bb, x, dense, bias, target, out_features=out_features)


def emit_sparse_linear(bb: relax.BlockBuilder, x: relax.Expr, values: relax.Expr, indices: relax.Expr,
                       bias: relax.Expr | None, *, fmt: NMFormat, out_features: int, in_features: int,
                       target: tvm.target.Target) -> relax.Expr:
    """Emit ``y = x @ densify(values, indices)^T + bias``; x f32 ``[..., K]``. A constant M of 1 runs
    the sparse GEMV (which needs :func:`supports`), anything else the sparse GEMM where
    :func:`supports_gemm`, else :func:`emit_densified_linear`."""
    x_shape = _static_or_symbolic_shape(x)
    rows = _product(x_shape[:-1])
    one_row = isinstance(rows, int) and rows == 1
    if not one_row and not supports_gemm(fmt, out_features, in_features, target):
        return emit_densified_linear(bb, x, values, indices, bias, fmt=fmt, out_features=out_features,
                                     in_features=in_features, target=target)
    if one_row and not supports(fmt, out_features, in_features, target):
        raise ValueError(f"sparse GEMV: {fmt.n}:{fmt.m} [{out_features}, {in_features}] is not supported on {target}")
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [rows, in_features]))
    shape = SparseShape(out_features, in_features, fmt.n, fmt.m, bias is not None)
    extra = [bias] if bias is not None else []
    if one_row:
        gv = bb.add_func(make_sparse_gemv(shape), f"sparse_linear_gemv_{shape.tag}")
        args = [x2d, values, indices, relax.const(lane_table(fmt))] + extra
    else:
        blocks = relax.call_tir(bb.add_func(make_x_blocks(in_features), f"sparse_linear_x_blocks_k{in_features}"),
                                [x2d], relax.TensorType([(rows + LANES - 1) // LANES, in_features, LANES], "float32"))
        xb = bb.emit(blocks)
        few = FEW_ROWS if supports(fmt, out_features, in_features, target) else 0  # the gathers need AVX-512
        gv = bb.add_func(make_sparse_gemm(shape, few_rows=few), f"sparse_linear_gemm_{shape.tag}")
        args = ([x2d, xb, values, indices, relax.const(lane_table(fmt))] if few else [xb, values, indices]) + extra
    y2d = bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, out_features], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [out_features]))
