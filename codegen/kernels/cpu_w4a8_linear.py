"""CPU kernels for 4-bit weights with int8 activations ("W4A8") on AVX-512 VNNI ``vpdpbusd``: a GEMM
(prefill) and a GEMV (decode, M == 1).

The CPU kernel of the ``linear_w4a8`` op (ir/int8_ops.py; codegen/lower_int8.py selects it): ``y = x @ W^T`` for a symmetric 4-bit weight
scheme with groups of 32, 64 or 128 input features (``w4g32``, ``w4g64``, ``w4g128``;
ir/quant_schemes.py: code ``c`` in 0..15 is the level ``c - 8``), with x quantized to int8 on the fly
in the weight's groups, so each group's dot products run in int8 x u4 with int32 sums.

Semantics (:func:`w4a8_reference` computes exactly this in numpy)
-----------------------------------------------------------------
Inputs: x f32 ``[M, K]``; the codes ``c[N, K]`` packed 8 per u32 little-end first (``[N, K/8]``, as
the IR stores them) and the scales ``sw`` f32 ``[N, ceil(K/group)]``. ``K`` is a multiple of 32; as
in the schemes, the last group is short when ``group`` does not divide ``K`` (SmolLM2's ``K = 576``
in ``w4g128``: 4 groups of 128, then one of 64), and the activations are grouped the same way.

1. x is quantized per (row ``m``, group ``g``) with :func:`ir.int8_ops.quantize_rows_int8` applied to each
   group: ``sx[m, g] = max|x[m, g-block]| / 127`` (1 if all zero), ``xq = clip(nearbyint(x / sx),
   -127, 127)`` as int8 (round half to even; the division is an f32 division).
2. ``isum[m, n, g] = sum_{k in g} xq[m, k] * (c[n, k] - 8)``, exact in int32.
3. ``y[m, n] = 0``, then for ``g = 0, 1, ...`` (ascending): ``y = fma(f32(isum[m, n, g]),
   f32(sx[m, g] * sw[n, g]), y)``: the scale product is rounded to f32, the multiply-add is fused
   (one rounding). The numpy reference emulates the fma in float64 (the product is exact there);
   its f64-then-f32 rounding of the sum can differ from the fma's single rounding by one ulp in
   rare ties, so tests compare with a tolerance of a few ulps of ``max|y|``.

The dot product: u4 codes x s8 activations with ``vpdpbusd``
------------------------------------------------------------
``vpdpbusd acc, a, b`` adds to each int32 lane the 4 products of the unsigned bytes of ``a`` with the
signed bytes of ``b``. A u32 word holds codes ``8w .. 8w+7`` of one output channel, code ``8w + i``
at bits ``4i``; so ``word & 0x0F0F0F0F`` holds the codes at even positions ``8w + 0, 2, 4, 6`` as
unsigned bytes, and ``(word >> 4) & 0x0F0F0F0F`` the odd ones ``8w + 1, 3, 5, 7``. The quantized
activations are stored in that order (:data:`PERMUTATION`: per 8 features, the even then the odd
ones), so the ``b`` operands are the 4-byte words ``xq_perm[m, 8w : 8w + 4]`` and
``xq_perm[m, 8w + 4 : 8w + 8]``, each broadcast to the 16 lanes. The codes are levels + 8, so
``sum_k (c - 8) * xq = acc - 8 * xsum`` with ``xsum[m, g] = sum_{k in g} xq[m, k]``: the int32
accumulator of each group starts at ``-8 * xsum`` (exact: ``|acc| <= 127 * 15 * group``).

Weight layout
-------------
As cpu_quant_linear.STORED_LAYOUT stores 4-bit linears: ``q[nb, w, j] = packed[64 nb + j, w]`` (u32)
and ``s[nb, g, j] = scales[64 nb + j, g]`` (f32), zero-padded past N. One 64-byte load of
``q[nb, w, 16 v : 16 v + 16]`` is the word ``w`` of 16 output channels.

The kernel
----------
1. Quantize the rows in parallel (per group: a vector max, an f32 division per element, round,
   clamp, a byte shuffle into :data:`PERMUTATION` order, a byte sum) into workspaces ``xq_perm`` (int8
   ``[M, K]``), ``sx`` (f32 ``[M, groups]``) and ``-8 * xsum`` (int32 ``[M, groups]``).
2. Parallel over (N block, row part) tasks, as cpu_quant_linear.make_quant_gemm: per register tile of
   ``rows x cols`` outputs (default :data:`ROWS` x :data:`COLS` = 4 x 32, two 16-lane vectors per
   row), ``rows * cols / 16`` int32 accumulators and as many f32 ones stay in registers (8 + 8 of the
   32 zmm). Per group, the int32 accumulators start at ``-8 * xsum``; per word, each 16-channel vector
   of codes is loaded once and split into its even and odd codes (an AND, a shift and an AND), which
   feed ``2 * rows`` ``vpdpbusd``; at the group's end each accumulator is flushed,
   ``f = fma(f32(acc), sx * sw, f)`` (a broadcast, a conversion, a multiply and an FMA per 16 outputs,
   against ``group / 4`` ``vpdpbusd``: groups of 32 take ~1.15x the time of groups of 128). The
   ``M % rows`` remainder rows run as tiles of 4, 2 and 1 rows (those smaller than ``rows``).

The GEMV (decode: M == 1, :func:`make_w4a8_gemv`)
------------------------------------------------
At M = 1 the weight stream is the bound: each code is read once and used once. x is quantized once
(serially, ~K elements), then the kernel runs parallel over the N blocks, as
cpu_quant_linear.make_quant_gemv; each block's codes are one contiguous stream read once. Per group,
each of the block's 4 vectors of 16 channels keeps two int32 accumulators, one for the even codes
(starting at ``-8 * xsum``) and one for the odd ones: 8 independent ``vpdpbusd`` chains, per word a
64-byte load, two ANDs and two ``vpdpbusd`` per vector. The odd codes stay in their high nibbles
(``word & 0xF0F0F0F0``, 16 times the code as an unsigned byte, at most 240): their accumulator holds
16 times their sum, exactly (``|acc| <= 16 * 15 * 127 * 64 < 2^31``), and an arithmetic shift by 4
at the group's end restores it. Each group's flush is the same ``fma(f32(even + odd), sx * sw, y)``
as the GEMM's, in ascending groups: the GEMV computes the op exactly as the GEMM (and the reference).

Measured on Zen 4, 1 thread (bench/bench_w4a8_linear.py --m 1, results/cpu_w4a8_linear_decode.md),
with the weights streamed from memory as in a model: 17-27 GB/s of packed codes + scales (77-111% of
a 24 GB/s numpy read; the small shapes lose a few us per call to the call and the stream's ramp-up),
1.3-1.65x as fast as make_quant_gemv and 1.6-2.4x as fast as the GEMM's one-row tiles (cache-resident
weights: 3.1-4.4x and 1.2-2.3x). Keeping the odd
codes in their high nibbles runs like shifting them down (within noise); software prefetch 16 or 64
words ahead runs 8-25% slower than the hardware prefetchers alone (the ``prefetch`` option, off).

Without VNNI (``vnni=False``) the same loop nests compute each 4-byte dot product with shifts, masks
and int32 multiply-adds (exact, portable, much slower). Built with TVM's IR builder, as cpu_quant_linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ...errors import LLMOptError
from ...ir.int8_ops import W4A8_CHUNK, W4A8_GROUPS, W4A8_OFFSET, linear_w4a8_reference, quantize_groups_int8
from ...ir.quant_schemes import Scheme
from .cpu_int8_linear import LANES, VNNI, has_vnni
from .cpu_linear import BLOCK_N, _kernel_attrs, _product, _static_or_symbolic_shape, _target_threads
from .cpu_quant_linear import _blocked, group_runs

GROUPS = W4A8_GROUPS
"""Input features per scale the kernel supports (each a whole number of 32-feature chunks)."""

CHUNK = W4A8_CHUNK
"""Features quantized per vector step (one f32x32 = two zmm of x)."""

PERMUTATION = tuple(8 * (j // 8) + j % 8 % 4 * 2 + j % 8 // 4 for j in range(CHUNK))
"""The order of the quantized activations in the workspace, per chunk of 32 features starting at
``c``: ``xq_perm[c + p] = xq[c + PERMUTATION[p]]``, i.e. per 8 features the ones at even positions,
then the odd ones (the order of the codes in ``word & 0x0F0F0F0F`` and ``(word >> 4) & 0x0F0F0F0F``)."""

ROWS = 4
"""Rows of x per register tile; with ``COLS``, 8 int32 and 8 f32 accumulators. On Zen 4
(bench/bench_w4a8_linear.py --tiles) 4 x 32, 5 x 32, 6 x 32 and 3 x 64 (accumulators in registers)
run within ~5% of each other; 6 x 64 (48 accumulators: the f32 ones spill to the stack, i.e. an L1
buffer) runs 1.7-2.6x slower. 4 rows build fast too: LLVM takes ~15 s over a 6-row kernel."""

COLS = 32
"""Output channels per register tile: two 16-lane vectors (see the module docstring)."""

GEMV_HIGH_NIBBLES = True
"""Whether the GEMV leaves the odd codes in their high nibbles (see :func:`make_w4a8_gemv`)."""

GEMV_PREFETCH = 0
"""How many words ahead the GEMV software-prefetches its codes (0: the hardware prefetchers only)."""

CODES_PER_WORD = 8
NIBBLES = 0x0F0F0F0F
OFFSET = W4A8_OFFSET
"""What a symmetric 4-bit code adds to its level."""


# ---- numpy reference ---------------------------------------------------------------------------

def quantize_activations(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """x f32 ``[M, K]`` quantized per (row, group of ``group`` features; the last one may be short):
    int8 codes ``[M, K]`` and scales f32 ``[M, ceil(K/group)]`` (``ir.int8_ops.quantize_groups_int8``)."""
    return quantize_groups_int8(x, group)


def w4a8_reference(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """What the kernel computes, the ``linear_w4a8`` op's reference (``ir.int8_ops.linear_w4a8_reference``)
    for the ``w4g<group>`` scheme: x f32 ``[M, K]``, ``packed`` u32 ``[N, K/8]``, ``scales`` f32
    ``[N, ceil(K/group)]`` -> y f32 ``[M, N]``."""
    return linear_w4a8_reference(x, packed, scales, f"w4g{group}")


# ---- what the kernel covers --------------------------------------------------------------------

def supports_w4a8(scheme: Scheme, in_features: int) -> bool:
    """Whether the kernel computes ``scheme`` on rows of ``in_features``: symmetric integer 4-bit
    codes in groups of 32, 64 or 128, ``in_features`` a multiple of 32 (a short last group allowed)."""
    return (scheme.bits == 4 and scheme.symmetric and scheme.codebook is None
            and scheme.group_of(in_features) in GROUPS and in_features % CHUNK == 0)


@dataclass(frozen=True)
class W4A8Shape:
    """Everything the kernel is specialized on (hashable: kernels are built once per shape)."""

    n: int
    k: int
    group: int

    def __post_init__(self):
        if self.group not in GROUPS or self.k <= 0 or self.k % CHUNK or self.n <= 0:
            raise LLMOptError(f"w4a8 linear: N={self.n}, K={self.k}, group={self.group} is not supported.",
                              f"Use groups of {', '.join(map(str, GROUPS))} input features and K a multiple "
                              f"of {CHUNK}.")

    @property
    def words(self) -> int:
        return self.k // CODES_PER_WORD

    @property
    def groups(self) -> int:
        """Groups per row, a short last one included."""
        return -(-self.k // self.group)

    @property
    def group_runs(self) -> tuple[tuple[int, int, int], ...]:
        """(first group, groups, features per group): cpu_quant_linear's ``group_runs`` in features."""
        return group_runs(self.k, self.group)

    @property
    def nblocks(self) -> int:
        return -(-self.n // BLOCK_N)

    @property
    def tag(self) -> str:
        return f"w4a8g{self.group}_n{self.n}_k{self.k}"


# ---- building blocks ---------------------------------------------------------------------------

class _Buffers(NamedTuple):
    """The kernel's operands and workspaces."""

    q: tirx.Buffer  # codes, blocked
    s: tirx.Buffer  # weight scales, blocked
    xq: tirx.Buffer  # int8 activations, PERMUTATION order
    sx: tirx.Buffer  # activation scales [M, groups]
    xc: tirx.Buffer  # -8 * xsum [M, groups]
    y: tirx.Buffer


def _vector(buffer: tirx.Buffer, *index, lanes: int = LANES) -> tirx.PrimExpr:
    """``buffer[*index[:-1], index[-1] : index[-1] + lanes]``."""
    return buffer[(*index[:-1], tirx.Ramp(index[-1], 1, lanes))]


def _store_vector(buffer: tirx.Buffer, value: tirx.PrimExpr, *index, lanes: int = LANES) -> None:
    T.buffer_store(buffer, value, [*index[:-1], tirx.Ramp(index[-1], 1, lanes)])


def _splat(value, dtype: str, lanes: int = LANES) -> tirx.PrimExpr:
    return tirx.Broadcast(tirx.const(value, dtype) if isinstance(value, (int, float)) else value, lanes)


def _reduce(intrinsic: str, dtype: str, vector: tirx.PrimExpr) -> tirx.PrimExpr:
    """A horizontal reduction of ``vector`` (``llvm.vector.reduce.<intrinsic>``)."""
    return tirx.call_llvm_pure_intrin(dtype, f"llvm.vector.reduce.{intrinsic}", vector)


def _quantize_row(shape: W4A8Shape, x, xq, sx, xc, r) -> None:
    """Row ``r`` of x into ``xq[r]`` (permuted int8), ``sx[r, g]`` and ``xc[r, g] = -8 * xsum``."""
    for first, count, features in shape.group_runs:
        with T.serial(0, count) as gi:
            _quantize_group(x, xq, sx, xc, r, first + gi, features // CHUNK, (first + gi) * shape.group)


def _quantize_group(x, xq, sx, xc, r, g, chunks: int, base) -> None:
    """Group ``g`` of row ``r``: ``chunks`` chunks of 32 features from feature ``base`` on.

    Two exact shortcuts for the horizontal sums (3x faster than LLVM's generic reductions): the
    largest ``|x|`` is the largest of their bit patterns as u32 (non-negative floats order like their
    bits; ``reduce.fmax`` would handle NaNs lane by lane), and ``sum(xq) = sum(u8(xq ^ 0x80)) - 128 * 32``
    per chunk, a sum of unsigned bytes, which LLVM computes with ``vpsadbw``."""
    amax = None
    for c in range(chunks):
        magnitude = tirx.abs(_vector(x, r, base + c * CHUNK, lanes=CHUNK))
        amax = magnitude if amax is None else tirx.max(amax, magnitude)
    amax = tirx.reinterpret("float32", _reduce("umax", "uint32", tirx.reinterpret(f"uint32x{CHUNK}", amax)))
    T.buffer_store(sx, tirx.Select(amax > tirx.const(0, "float32"), amax / tirx.const(127, "float32"),
                                   tirx.const(1, "float32")), [r, g])
    total = None
    for c in range(chunks):
        start = base + c * CHUNK
        scaled = tirx.nearbyint(_vector(x, r, start, lanes=CHUNK) / _splat(sx[r, g], "float32", CHUNK))
        clamped = tirx.max(tirx.min(scaled, _splat(127.0, "float32", CHUNK)), _splat(-127.0, "float32", CHUNK))
        codes = tirx.Cast(f"int8x{CHUNK}", clamped)
        _store_vector(xq, tirx.Shuffle([codes], list(PERMUTATION)), r, start, lanes=CHUNK)
        biased = tirx.bitwise_xor(_vector(xq, r, start, lanes=CHUNK), _splat(-128, "int8", CHUNK))  # xq + 128
        part = _reduce("add", "int32", tirx.Cast(f"int32x{CHUNK}", tirx.reinterpret(f"uint8x{CHUNK}", biased)))
        part = part - tirx.const(128 * CHUNK, "int32")
        total = part if total is None else total + part
    T.buffer_store(xc, total * tirx.const(-OFFSET, "int32"), [r, g])


def _dot(vnni: bool, acc: tirx.PrimExpr, codes: tirx.PrimExpr, xq: tirx.Buffer, row, k0) -> tirx.PrimExpr:
    """``acc`` (int32 x 16) plus, per lane, the dot product of the 4 unsigned bytes of ``codes``
    (u32 x 16) with the signed ``xq[row, k0 : k0 + 4]``."""
    if vnni:
        x4 = tirx.reinterpret("int32", _vector(xq, row, k0, lanes=4))
        return tirx.call_llvm_pure_intrin(f"int32x{LANES}", VNNI, acc, tirx.reinterpret("int8x64", codes),
                                          tirx.reinterpret("int8x64", _splat(x4, "int32")))
    for b in range(4):
        byte = tirx.bitwise_and(tirx.shift_right(codes, _splat(8 * b, "uint32")) if b else codes,
                                _splat(255, "uint32"))
        acc = acc + _splat(tirx.Cast("int32", xq[row, k0 + b]), "int32") * tirx.Cast(f"int32x{LANES}", byte)
    return acc


def _tile(shape: W4A8Shape, vnni: bool, bufs: _Buffers, jo, col: int, row0, rows: int, vectors: int) -> None:
    """The ``rows x (16 * vectors)`` output tile at ``row0``, columns ``col ...`` of block ``jo``:
    int32 group sums and f32 totals in registers (see the module docstring), then stored to y."""
    isum = [T.alloc_buffer((rows, LANES), "int32", scope="global") for _ in range(vectors)]
    total = [T.alloc_buffer((rows, LANES), "float32", scope="global") for _ in range(vectors)]
    for v in range(vectors):
        for i in range(rows):
            _store_vector(total[v], _splat(0.0, "float32"), i, 0)
    for first, count, features in shape.group_runs:
        with T.serial(0, count) as gi:
            _group(shape, vnni, bufs, isum, total, first + gi, features // CODES_PER_WORD, jo, col, row0, rows)
    for v in range(vectors):
        for i in range(rows):
            _store_row(total[v], i, bufs.y, row0 + i, jo * BLOCK_N + col + v * LANES, shape.n)


def _group(shape: W4A8Shape, vnni: bool, bufs: _Buffers, isum: list, total: list, g, words: int, jo, col: int,
           row0, rows: int) -> None:
    """Adds group ``g`` (``words`` words) of the tile to ``total``: int32 sums in ``isum``, flushed."""
    q, s, xq, sx, xc = bufs.q, bufs.s, bufs.xq, bufs.sx, bufs.xc
    vectors, mask = len(isum), _splat(NIBBLES, "uint32")
    for v in range(vectors):
        for i in range(rows):
            _store_vector(isum[v], _splat(xc[row0 + i, g], "int32"), i, 0)
    with T.serial(0, words) as wg:
        w = g * (shape.group // CODES_PER_WORD) + wg
        for v in range(vectors):
            word = _vector(q, jo, w, col + v * LANES)
            halves = (tirx.bitwise_and(word, mask),
                      tirx.bitwise_and(tirx.shift_right(word, _splat(4, "uint32")), mask))
            for i in range(rows):
                acc = _vector(isum[v], i, 0)
                for h, codes in enumerate(halves):
                    acc = _dot(vnni, acc, codes, xq, row0 + i, w * CODES_PER_WORD + 4 * h)
                _store_vector(isum[v], acc, i, 0)
    for v in range(vectors):
        ws = _vector(s, jo, g, col + v * LANES)
        for i in range(rows):
            scale = _splat(sx[row0 + i, g], "float32") * ws
            _store_vector(total[v], T.fma(tirx.Cast(f"float32x{LANES}", _vector(isum[v], i, 0)), scale,
                                          _vector(total[v], i, 0)), i, 0)


def _store_row(total: tirx.Buffer, i: int, y: tirx.Buffer, row, col0, n: int) -> None:
    """``y[row, col0 : col0 + 16] = total[i]``, the columns past ``n`` left out."""
    if n % BLOCK_N == 0:
        _store_vector(y, _vector(total, i, 0), row, col0)
        return
    if n % LANES == 0:  # every 16-column vector is wholly inside or wholly past N
        with T.If(col0 < n):
            with T.Then():
                _store_vector(y, _vector(total, i, 0), row, col0)
        return
    # element by element through a separate buffer: an indexed read of ``total`` would keep it in memory
    tail = T.alloc_buffer((LANES,), "float32", scope="global")
    _store_vector(tail, _vector(total, i, 0), 0)
    with T.serial(0, LANES) as j:
        with T.If(col0 + j < n):
            with T.Then():
                T.buffer_store(y, tail[j], [row, col0 + j])


# ---- the kernel --------------------------------------------------------------------------------

@cache  # a model asks for the same few shapes many times
def make_w4a8_gemm(shape: W4A8Shape, vnni: bool, threads: int = 1, rows: int = ROWS,
                   cols: int = COLS) -> tirx.PrimFunc:
    """``gemm(x[M, K], q, s) -> y[M, N]`` for symbolic M (see the module docstring); ``q`` u32
    ``[ceil(N/64), K/8, 64]`` and ``s`` f32 ``[ceil(N/64), ceil(K/group), 64]`` in the blocked layout.
    ``rows x cols`` register tiles (``cols`` in 16, 32, 64) with 4-, 2-, 1-row tiles (those smaller
    than ``rows``) for the ``M % rows`` remainder; the parallel loop runs over (N block, row part)
    pairs, the full row tiles of each block split into ``threads`` parts."""
    assert 1 <= rows <= 7, "the remainder tiles (4, 2, 1 rows) cover at most 7 rows"
    assert cols in (16, 32, 64), "a tile covers 1, 2 or 4 vectors of 16 output channels"
    mr, parts, vectors = rows, threads, cols // LANES
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            m = T.int64()
            x = T.match_buffer(T.arg("x", T.handle()), (m, shape.k), "float32")
            q = T.arg("q", T.buffer((shape.nblocks, shape.words, BLOCK_N), "uint32"))
            s = T.arg("s", T.buffer((shape.nblocks, shape.groups, BLOCK_N), "float32"))
            y = T.match_buffer(T.arg("y", T.handle()), (m, shape.n), "float32")
            xq = T.alloc_buffer((m, shape.k), "int8", scope="global")
            sx = T.alloc_buffer((m, shape.groups), "float32", scope="global")
            xc = T.alloc_buffer((m, shape.groups), "int32", scope="global")
            bufs = _Buffers(q, s, xq, sx, xc, y)
            with T.parallel(0, m) as r:
                _quantize_row(shape, x, xq, sx, xc, r)

            def row_tile(jo, row0, rows: int):
                for col in range(0, BLOCK_N, cols):
                    if shape.n % BLOCK_N == 0 or col == 0:
                        _tile(shape, vnni, bufs, jo, col, row0, rows, vectors)
                        continue
                    with T.If(jo * BLOCK_N + col < shape.n):  # the last block's columns past N
                        with T.Then():
                            _tile(shape, vnni, bufs, jo, col, row0, rows, vectors)

            def when(condition, body):
                with T.If(condition):
                    with T.Then():
                        body()

            full = m // mr  # full row tiles
            with T.parallel(0, shape.nblocks * parts) as task:
                jo, part = task // parts, task % parts
                first, end, last = part * full // parts, (part + 1) * full // parts, part == parts - 1
                with T.serial(first, end) as mo:
                    row_tile(jo, mo * mr, mr)
                # remainder rows r = m % mr (< 8) as tiles of 4, 2, 1 rows (cpu_quant_linear.make_quant_gemm)
                rest = m % mr
                for rows in (t for t in (4, 2, 1) if t < mr):
                    when(tirx.And(last, rest // rows % 2 == 1),
                         lambda rows=rows: row_tile(jo, full * mr + rest // (2 * rows) * (2 * rows), rows))
    return builder.get()


# ---- the decode kernel (M == 1) ----------------------------------------------------------------

def _gemv_block(shape: W4A8Shape, vnni: bool, bufs: _Buffers, jo, high_nibbles: bool, prefetch: int) -> None:
    """``y[0, block jo]`` (64 output channels): per group, two int32 accumulators per 16-channel vector
    (the even codes and the odd ones: 8 independent ``vpdpbusd`` chains), flushed into f32 totals."""
    q, s, xq, sx, xc = bufs.q, bufs.s, bufs.xq, bufs.sx, bufs.xc
    vectors = BLOCK_N // LANES
    even = [T.alloc_buffer((1, LANES), "int32", scope="global") for _ in range(vectors)]
    odd = [T.alloc_buffer((1, LANES), "int32", scope="global") for _ in range(vectors)]
    total = [T.alloc_buffer((1, LANES), "float32", scope="global") for _ in range(vectors)]
    low = _splat(NIBBLES, "uint32")
    high = _splat(NIBBLES << 4 & 0xFFFFFFFF, "uint32")
    for v in range(vectors):
        _store_vector(total[v], _splat(0.0, "float32"), 0, 0)
    for first, count, features in shape.group_runs:
        with T.serial(0, count) as gi:
            g = first + gi
            for v in range(vectors):
                _store_vector(even[v], _splat(xc[0, g], "int32"), 0, 0)
                _store_vector(odd[v], _splat(0, "int32"), 0, 0)
            with T.serial(0, features // CODES_PER_WORD) as wg:
                w = g * (shape.group // CODES_PER_WORD) + wg
                if prefetch:
                    _prefetch_codes(shape, q, jo, w + prefetch)
                for v in range(vectors):
                    word = _vector(q, jo, w, v * LANES)
                    odd_codes = (tirx.bitwise_and(word, high) if high_nibbles
                                 else tirx.bitwise_and(tirx.shift_right(word, _splat(4, "uint32")), low))
                    _store_vector(even[v], _dot(vnni, _vector(even[v], 0, 0), tirx.bitwise_and(word, low), xq, 0,
                                                w * CODES_PER_WORD), 0, 0)
                    _store_vector(odd[v], _dot(vnni, _vector(odd[v], 0, 0), odd_codes, xq, 0,
                                               w * CODES_PER_WORD + 4), 0, 0)
            for v in range(vectors):
                odd_sum = _vector(odd[v], 0, 0)
                if high_nibbles:  # the odd codes counted 16 times: an exact arithmetic shift
                    odd_sum = tirx.shift_right(odd_sum, _splat(4, "int32"))
                isum = _vector(even[v], 0, 0) + odd_sum
                scale = _splat(sx[0, g], "float32") * _vector(s, jo, g, v * LANES)
                _store_vector(total[v], T.fma(tirx.Cast(f"float32x{LANES}", isum), scale, _vector(total[v], 0, 0)),
                              0, 0)
    for v in range(vectors):
        _store_row(total[v], 0, bufs.y, 0, jo * BLOCK_N + v * LANES, shape.n)


def _prefetch_codes(shape: W4A8Shape, q: tirx.Buffer, jo, ahead) -> None:
    """Software prefetch (``prefetcht0``) of the 4 lines of word ``ahead`` of block ``jo``: past the
    block's last word, the next block's words (the codes are one stream); not past the last block."""
    flat = jo * shape.words + ahead
    block, word = tirx.min(flat // shape.words, shape.nblocks - 1), flat % shape.words
    for line in range(0, BLOCK_N, LANES):
        T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(q[block, word, line]),
                                         0, 3, 1))


@cache
def make_w4a8_gemv(shape: W4A8Shape, vnni: bool, high_nibbles: bool = GEMV_HIGH_NIBBLES,
                   prefetch: int = GEMV_PREFETCH) -> tirx.PrimFunc:
    """``gemv(x[1, K], q, s) -> y[1, N]``, the decode kernel (see the module docstring): x quantized
    once, then parallel over the N blocks, each block's codes streamed once. ``high_nibbles``: the odd
    codes stay in their high nibbles (``word & 0xF0F0F0F0``, 16 times the code: one shift less per
    word, one per group more); ``prefetch``: software-prefetch the codes that many words ahead (0: none)."""
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr(_kernel_attrs())
            x = T.arg("x", T.buffer((1, shape.k), "float32"))
            q = T.arg("q", T.buffer((shape.nblocks, shape.words, BLOCK_N), "uint32"))
            s = T.arg("s", T.buffer((shape.nblocks, shape.groups, BLOCK_N), "float32"))
            y = T.arg("y", T.buffer((1, shape.n), "float32"))
            xq = T.alloc_buffer((1, shape.k), "int8", scope="global")
            sx = T.alloc_buffer((1, shape.groups), "float32", scope="global")
            xc = T.alloc_buffer((1, shape.groups), "int32", scope="global")
            bufs = _Buffers(q, s, xq, sx, xc, y)
            _quantize_row(shape, x, xq, sx, xc, 0)
            with T.parallel(0, shape.nblocks) as jo:
                _gemv_block(shape, vnni, bufs, jo, high_nibbles, prefetch)
    return builder.get()


def emit_w4a8_linear(bb: relax.BlockBuilder, x: relax.Expr, codes: relax.Expr, scales: relax.Expr, *,
                     out_features: int, group: int, target: tvm.target.Target, vnni: bool | None = None,
                     rows: int = ROWS, cols: int = COLS) -> relax.Expr:
    """Emit the W4A8 linear for x f32 ``[..., K]``; ``codes`` u32 and ``scales`` f32 either blocked
    (``[ceil(N/64), K/8, 64]``, ``[ceil(N/64), ceil(K/group), 64]``, as stored) or in the IR's
    ``[N, K/8]``, ``[N, ceil(K/group)]`` (blocked inside the graph: a per-call copy). ``vnni``: use ``vpdpbusd``
    (default: when the target's CPU has it). A constant M of 1 selects the GEMV, anything else the GEMM
    (``rows x cols`` register tiles)."""
    x_shape = _static_or_symbolic_shape(x)
    shape = W4A8Shape(out_features, int(x_shape[-1]), group)
    codes, scales = _blocked(bb, codes), _blocked(bb, scales)
    m = _product(x_shape[:-1])
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [m, shape.k]))
    vnni = has_vnni(target) if vnni is None else vnni
    if isinstance(m, int) and m == 1:
        kind, func = "gemv", make_w4a8_gemv(shape, vnni)
    else:
        kind, func = "gemm", make_w4a8_gemm(shape, vnni, _target_threads(target), rows, cols)
    gv = bb.add_func(func, f"linear_{kind}_{shape.tag}")
    y2d = bb.emit(relax.call_tir(gv, [x2d, codes, scales], relax.TensorType([m, shape.n], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [shape.n]))
