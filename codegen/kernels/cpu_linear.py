"""Hand-scheduled fp32 ``linear`` kernels (y = x @ W^T + b) for the llvm (CPU) target.

Weight layout
-------------
Both kernels read one stored weight layout, :data:`WEIGHT_LAYOUT`: the PyTorch weight
``W[N, K]`` cut into blocks of ``BLOCK_N`` output channels, each block stored k-major::

    w_packed[nb, k, j] = W[nb * BLOCK_N + j, k]     (zero for nb * BLOCK_N + j >= N)
    w_packed.shape == (ceil(N / BLOCK_N), K, BLOCK_N)

For a fixed ``k`` the ``BLOCK_N`` weights of a block are contiguous, i.e. exactly the
vector registers of an output tile. This one layout serves both kernels:

* GEMV (decode, M == 1): each N block is one contiguous ``K * BLOCK_N`` stream, read
  once with vector loads and FMA'd into vector accumulators. No horizontal reductions,
  no strided loads, and the hardware prefetcher sees purely sequential streams, so the
  kernel runs at memory bandwidth.
* GEMM (prefill, any M): the textbook packed-B register tile. A ``GEMM_ROWS x BLOCK_N``
  tile of y lives in ``GEMM_ROWS * BLOCK_N / 16`` AVX-512 registers; every k step
  broadcasts ``GEMM_ROWS`` x values and loads one contiguous weight row of the block.
  The block (``K * BLOCK_N * 4`` bytes) stays in L2 while all row tiles of x pass over it.

The numbers above are x86's; an aarch64 target (NEON: 4 f32 lanes) keeps fewer rows and partial
sums of accumulators in registers (``cpu_isa.NEON``), from the same weight layout.

Weights are runtime inputs, so packing happens once, ahead of time
(:func:`pack_weight_for_gemm`); :func:`emit_linear` also accepts an unpacked ``[N, K]``
weight and then packs it inside the graph (folded away by ``FoldConstant`` when the
weight is a constant, otherwise a per-call copy: prefer storing packed weights).

The kernels are written directly as loop-level TIR (not derived with ``s_tir.Schedule``)
because the tails need explicit control: M is symbolic, and a split of a symbolic loop
would put a row predicate inside the FMA loop. Here full row tiles run predicate-free and
the ``M % GEMM_ROWS`` remainder runs as smaller unrolled tiles (4, 2, 1 rows). The N
remainder is handled by zero padding of the packed weight plus a guarded store; K has no
tail in the GEMM and a scalar-step remainder loop in the GEMV.

The PrimFuncs carry ``op_pattern = 8`` (opaque: FuseOps never fuses them) and
``tirx.is_scheduled`` (dlight / MetaSchedule leave them alone), so the Relax pipeline
(LegalizeOps, FuseOps/FuseTIR, ``tvm.compile``) keeps them as written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache, reduce

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

from .cpu_isa import X86, vector_unit

BLOCK_N = 64
"""Output channels per packed weight block: four AVX-512 vectors of fp32."""

GEMM_ROWS = X86.gemm_rows
"""Rows of x per GEMM register tile on x86: 6 x 64 fp32 = 24 accumulator zmm registers (aarch64:
cpu_isa.NEON's). At most 7: the remainder rows are covered by 4-, 2- and 1-row tiles, and a half
tile (rows x 32 floats) must stay below 1 KiB to live on the stack (see ``HALF``)."""

GEMV_SPLIT_K = X86.gemv_split
"""Independent partial sums per output vector in the GEMV on x86, to hide FMA latency (aarch64:
cpu_isa.NEON's, whose 64 columns already are 16 registers)."""

_OPAQUE = 8  # relax OpPatternKind.kOpaque


@dataclass(frozen=True)
class PackedWeightLayout:
    """The stored layout of a linear weight: ``[ceil(N / block), K, block]``, zero-padded.

    ``w_packed[nb, k, j] = W[nb * block + j, k]`` for the PyTorch weight ``W[N, K]``.
    """

    block: int

    @property
    def description(self) -> str:
        """A one-line description, e.g. for artifact metadata."""
        b = self.block
        return f"fp32 [ceil(N/{b}), K, {b}]: w_packed[i, k, j] = W[{b}*i + j, k], zero-padded"

    def packed_shape(self, n: int, k: int) -> tuple[int, int, int]:
        """Shape of the packed weight for ``W[n, k]``."""
        return (-(-n // self.block), k, self.block)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """Pack a PyTorch-layout weight ``[N, K]``."""
        n, k = w.shape
        packed = np.zeros(self.packed_shape(n, k), dtype=w.dtype)
        for i, start in enumerate(range(0, n, self.block)):  # block by block: no padded copy of w
            rows = w[start:start + self.block]
            packed[i, :, :len(rows)] = rows.T
        return packed

    def unpack(self, w_packed: np.ndarray, n: int) -> np.ndarray:
        """Inverse of :meth:`pack`: the ``[n, K]`` weight."""
        nblocks, k, block = w_packed.shape
        return np.ascontiguousarray(w_packed.transpose(0, 2, 1).reshape(nblocks * block, k)[:n])

    def pack_te(self, w: te.Tensor) -> te.Tensor:
        """The same packing as a TE computation (used when the graph holds an unpacked weight)."""
        n, k = (int(d) for d in w.shape)
        block = self.block
        return te.compute(
            self.packed_shape(n, k),
            lambda b, kk, j: tirx.if_then_else(
                b * block + j < n, w[b * block + j, kk], tirx.const(0, w.dtype)
            ),
            name="pack_linear_weight",
        )


WEIGHT_LAYOUT = PackedWeightLayout(block=BLOCK_N)
"""The layout every fp32 linear weight is stored in for the CPU kernels."""


def pack_weight_for_gemm(w: np.ndarray) -> np.ndarray:
    """Pack a PyTorch-layout ``[N, K]`` weight into :data:`WEIGHT_LAYOUT` (for GEMV and GEMM)."""
    return WEIGHT_LAYOUT.pack(w)


def host_cpu_target(num_threads: int | None = None) -> tvm.target.Target:
    """The llvm target for this machine, with its CPU named explicitly.

    ``mcpu="native"`` silently falls back to ``generic`` (no AVX-512), so the CPU name is
    detected with LLVM. ``num-cores`` (default: the CPUs this process may run on) sets the
    parallel granularity the kernels are built for.
    """
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if num_threads is None:
        num_threads = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": num_threads})


def emit_linear(
    bb: relax.BlockBuilder,
    x: relax.Expr,
    w: relax.Expr,
    bias: relax.Expr | None,
    target: tvm.target.Target,
    *,
    out_features: int | None = None,
) -> relax.Expr:
    """Emit ``y = x @ W^T + bias`` with the hand-scheduled CPU kernels.

    x: float32 ``[..., K]`` (leading dims may be symbolic). w: either the PyTorch layout
    ``[N, K]`` (packed inside the graph) or pre-packed ``[ceil(N / BLOCK_N), K, BLOCK_N]``
    (:data:`WEIGHT_LAYOUT`). bias: ``[N]`` or None. ``out_features`` (N) is needed only for
    a pre-packed weight without bias. Returns ``[..., N]``.

    A constant M of 1 selects the GEMV kernel, anything else the tiled GEMM, both blocked for the
    target's vector unit (:func:`cpu_isa.vector_unit`).
    """
    x_shape = _static_or_symbolic_shape(x)
    if x.ty.dtype != "float32" or w.ty.dtype not in ("float32", "float16"):
        raise NotImplementedError(f"cpu linear kernels take f32 x and an f32 or f16 weight, got {x.ty.dtype}, "
                                  f"{w.ty.dtype}")
    wdtype = str(w.ty.dtype)
    k = int(x_shape[-1])
    n, w_packed = _packed_weight(bb, w, bias, k, out_features)
    rows = _product(x_shape[:-1])
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [rows, k]))

    has_bias, unit = bias is not None, vector_unit(target)
    if isinstance(rows, int) and rows == 1:
        kind, func = "gemv", make_gemv(n, k, has_bias, wdtype, split=unit.gemv_split)
    else:
        kind, func = "gemm", make_gemm(n, k, has_bias, _target_threads(target), wdtype, rows=unit.gemm_rows)
    half = "_f16" if wdtype == "float16" else ""
    gv = bb.add_func(func, f"linear_{kind}_n{n}_k{k}{half}{'_bias' if has_bias else ''}")
    args = [x2d, w_packed] + ([bias] if has_bias else [])
    y2d = bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, n], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [n]))


def _target_threads(target: tvm.target.Target) -> int:
    """The thread count the target is built for (its ``num-cores``; 1 when unset)."""
    cores = target.attrs.get("num-cores")
    return max(1, int(cores)) if cores is not None else 1


def _product(dims: list[tirx.PrimExpr]) -> int | tirx.PrimExpr:
    """Product of shape dims: a Python int when all are constant, else a PrimExpr."""
    const = math.prod(int(d) for d in dims if isinstance(d, tirx.IntImm))
    symbolic = [d for d in dims if not isinstance(d, tirx.IntImm)]
    if not symbolic:
        return const
    expr = reduce(lambda a, b: a * b, symbolic)
    return expr if const == 1 else expr * const


def _static_or_symbolic_shape(x: relax.Expr) -> list[tirx.PrimExpr]:
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise ValueError(f"linear operand needs a known shape, got {ty}")
    return list(ty.shape.values)


def _packed_weight(
    bb: relax.BlockBuilder,
    w: relax.Expr,
    bias: relax.Expr | None,
    k: int,
    out_features: int | None,
) -> tuple[int, relax.Expr]:
    """Return (N, weight in :data:`WEIGHT_LAYOUT`), packing an ``[N, K]`` weight in-graph."""
    w_shape = [int(d) for d in _static_or_symbolic_shape(w)]
    if len(w_shape) == 2:
        n, wk = w_shape
        if wk != k:
            raise ValueError(f"linear: x has K={k} but weight is {w_shape}")
        return n, bb.emit_te(WEIGHT_LAYOUT.pack_te, w, primfunc_name_hint="pack_linear_weight")
    if w_shape[1:] != [k, BLOCK_N]:
        raise ValueError(f"linear: packed weight {w_shape} does not match K={k}, {WEIGHT_LAYOUT}")
    if bias is not None:
        n = int(_static_or_symbolic_shape(bias)[0])
    elif out_features is not None:
        n = out_features
    else:
        raise ValueError("linear: a pre-packed weight without bias needs out_features")
    if -(-n // BLOCK_N) != w_shape[0]:
        raise ValueError(f"linear: N={n} does not match packed weight {w_shape}")
    return n, w


def _kernel_attrs() -> dict:
    return {"op_pattern": _OPAQUE, "tirx.noalias": True, "tirx.is_scheduled": True}


# Register tiles. A ``rows x BLOCK_N`` accumulator tile is held as two ``rows x HALF``
# buffers ("lo" and "hi" columns) of "global" scope, declared inside the parallel loop.
# TVM's LowerTVMBuiltin leaves a CPU allocation on the stack only when its scope is
# "global" and it is smaller than 1 KiB (kMaxStackAlloca); anything else ("local" scope,
# or 6 x 64 floats in one buffer) becomes a TVMBackendAllocWorkspace heap buffer. LLVM
# keeps a heap tile in registers only if it can prove that the tile does not alias x and
# w, which it cannot once the kernel is inlined into its packed-call wrapper (as in the
# Relax VM build): every FMA then round-trips through memory and the GEMM runs at half
# speed. Stack allocas of at most 6 x 32 floats are always promoted to registers.
HALF = BLOCK_N // 2


@T.macro
def _zero(lo, hi, rows):
    for i in T.unroll(rows):
        for j in T.vectorized(HALF):
            lo[i, j] = T.float32(0)
        for j in T.vectorized(HALF):
            hi[i, j] = T.float32(0)


@T.macro
def _fma_row(lo, hi, i, xv, w, jo, kk):
    """Tile row i += xv * w[jo, kk, :] (one broadcast, BLOCK_N / 16 vector FMAs; an f16 weight row is
    widened on load, vcvtph2ps)."""
    for j in T.vectorized(HALF):
        lo[i, j] = lo[i, j] + xv * T.Cast("float32", w[jo, kk, j])
    for j in T.vectorized(HALF):
        hi[i, j] = hi[i, j] + xv * T.Cast("float32", w[jo, kk, HALF + j])


@T.macro
def _prefetch(w, jo, kk, j):
    """Software prefetch (read, keep in all cache levels) of the line holding w[jo, kk, j]."""
    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(w[jo, kk, j]), 0, 3, 1))


def _row_store(n: int, has_bias: bool):
    """A macro storing tile row ``i`` to ``y[row, block jo]``, adding the bias.

    When N is a multiple of BLOCK_N the store is an unguarded vector store; otherwise the
    last block is partial and every element store is guarded by ``col < n``.
    """
    guarded = n % BLOCK_N != 0

    @T.macro
    def store_half(y, b, acc, i, row, col0):
        if guarded:
            for j in range(HALF):
                if col0 + j < n:
                    if has_bias:
                        y[row, col0 + j] = acc[i, j] + b[col0 + j]
                    else:
                        y[row, col0 + j] = acc[i, j]
        else:
            for j in T.vectorized(HALF):
                if has_bias:
                    y[row, col0 + j] = acc[i, j] + b[col0 + j]
                else:
                    y[row, col0 + j] = acc[i, j]

    @T.macro
    def store_row(y, b, lo, hi, i, row, jo):
        store_half(y, b, lo, i, row, jo * BLOCK_N)
        store_half(y, b, hi, i, row, jo * BLOCK_N + HALF)

    return store_row


@cache  # a model asks for the same few shapes hundreds of times; TVMScript parsing is slow
def make_gemv(n: int, k: int, has_bias: bool, wdtype: str = "float32", *, split: int = GEMV_SPLIT_K) -> tirx.PrimFunc:
    """The M == 1 kernel: ``y[1, n] = x[1, k] @ W^T (+ bias)`` on the packed weight.

    Schedule: parallel over N blocks, so each thread reads one contiguous part of the
    weight front to back. Per block, k is split by ``split`` (rfactor): row k goes
    to partial sum ``k % split``, a ``BLOCK_N``-wide vector, giving (x86, split 4) 4 x 4 zmm
    independent FMA chains so that FMA latency never throttles the loads; the partial sums
    are added once at the end, and the ``K % split`` last rows go to partial sum 0.
    """
    nblocks = -(-n // BLOCK_N)
    k_main = k // split * split
    store_row = _row_store(n, has_bias)

    @T.macro
    def block_dot(x, w, y, b, jo):
        lo = T.alloc_buffer((split, HALF), "float32", scope="global")
        hi = T.alloc_buffer((split, HALF), "float32", scope="global")
        _zero(lo, hi, split)
        for ko in range(k // split):
            for s in T.unroll(split):
                _fma_row(lo, hi, s, x[0, ko * split + s], w, jo, ko * split + s)
        for kt in range(k - k_main):
            _fma_row(lo, hi, 0, x[0, k_main + kt], w, jo, k_main + kt)
        for s in T.unroll(1, split):
            for j in T.vectorized(HALF):
                lo[0, j] = lo[0, j] + lo[s, j]
            for j in T.vectorized(HALF):
                hi[0, j] = hi[0, j] + hi[s, j]
        store_row(y, b, lo, hi, 0, 0, jo)

    if has_bias:

        @T.prim_func(private=True)
        def gemv(
            x: T.Buffer((1, k), "float32"),
            w: T.Buffer((nblocks, k, BLOCK_N), wdtype),
            b: T.Buffer((n,), "float32"),
            y: T.Buffer((1, n), "float32"),
        ):
            T.func_attr(_kernel_attrs())
            for jo in T.parallel(nblocks):
                block_dot(x, w, y, b, jo)

    else:

        @T.prim_func(private=True)
        def gemv(
            x: T.Buffer((1, k), "float32"),
            w: T.Buffer((nblocks, k, BLOCK_N), wdtype),
            y: T.Buffer((1, n), "float32"),
        ):
            T.func_attr(_kernel_attrs())
            for jo in T.parallel(nblocks):
                block_dot(x, w, y, None, jo)

    return gemv


@cache
def make_gemm(n: int, k: int, has_bias: bool, threads: int = 1, wdtype: str = "float32", *,
              rows: int = GEMM_ROWS) -> tirx.PrimFunc:
    """The general kernel for symbolic M: ``y[m, n] = x[m, k] @ W^T (+ bias)``.

    Schedule: per N block, the packed ``K x BLOCK_N`` weight panel stays in L2 while the
    row tiles of x sweep over it. A ``rows x BLOCK_N`` register tile (``rows`` <= 7) accumulates over
    all of K (per k: ``rows`` broadcasts of x, one ``BLOCK_N`` weight row loaded once
    and reused by every row), then is stored once with the bias added. The
    ``m % rows`` remaining rows use 4-, 2- and 1-row tiles of the same code.

    The first tile to touch a panel would stall on DRAM (a panel is 147 KB for K = 576),
    so every full tile also prefetches one cache line of the next panel per k step: the
    first ``BLOCK_N / 16`` tiles of a panel pull in all of the next one, the later ones
    re-touch it in L2 (cheap). This is worth ~10% on the lm_head shape (N = 49152).

    The parallel loop runs over (N block, row part) pairs, the full row tiles being split
    into ``threads`` equal parts, so every thread gets the same work even when the number
    of N blocks is small or not a multiple of the thread count (N = 192 is 3 blocks).
    """
    assert 1 <= rows <= 7, "the remainder tiles (4, 2, 1 rows) cover at most 7 rows"
    nblocks, mr, parts = -(-n // BLOCK_N), rows, threads
    per_line = 64 // np.dtype(wdtype).itemsize  # weights per 64-byte cache line
    lines = BLOCK_N // per_line  # cache lines per weight row of a panel
    store_row = _row_store(n, has_bias)

    @T.macro
    def prefetch_next_panel(w, jo, step):
        # Cache line `step` (modulo the panel's k * lines lines) of the next panel. (No
        # local variable: TVMScript would make it a heap buffer inside the parallel loop.)
        _prefetch(
            w,
            T.min(jo + 1, nblocks - 1),
            step % (k * lines) // lines,
            step % lines * per_line,
        )

    @T.macro
    def tile(x, w, y, b, jo, row0, rows, prefetch):
        lo = T.alloc_buffer((rows, HALF), "float32", scope="global")
        hi = T.alloc_buffer((rows, HALF), "float32", scope="global")
        _zero(lo, hi, rows)
        for kk in range(k):
            if prefetch:
                prefetch_next_panel(w, jo, row0 // mr * k + kk)
            for i in T.unroll(rows):
                _fma_row(lo, hi, i, x[row0 + i, kk], w, jo, kk)
        for i in T.unroll(rows):
            store_row(y, b, lo, hi, i, row0 + i, jo)

    @T.macro
    def panel_part(x, w, y, b, m, jo, part):
        for mo in range(part * (m // mr) // parts, (part + 1) * (m // mr) // parts):
            tile(x, w, y, b, jo, mo * mr, mr, True)
        # Remainder rows r = m % mr (< 8) as tiles of 4, 2, 1 rows: the t-row tile runs when
        # bit t of r is set, after the larger tiles, i.e. at (r // 2t) * 2t past the full tiles.
        if part == parts - 1:
            if m % mr // 4 % 2 == 1:
                tile(x, w, y, b, jo, m // mr * mr, 4, False)
            if m % mr // 2 % 2 == 1:
                tile(x, w, y, b, jo, m // mr * mr + m % mr // 4 * 4, 2, False)
            if m % mr % 2 == 1:
                tile(x, w, y, b, jo, m // mr * mr + m % mr // 2 * 2, 1, False)

    if has_bias:

        @T.prim_func(private=True)
        def gemm(
            var_x: T.handle,
            w: T.Buffer((nblocks, k, BLOCK_N), wdtype),
            b: T.Buffer((n,), "float32"),
            var_y: T.handle,
        ):
            T.func_attr(_kernel_attrs())
            m = T.int64()
            x = T.match_buffer(var_x, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            for task in T.parallel(nblocks * parts):
                panel_part(x, w, y, b, m, task // parts, task % parts)

    else:

        @T.prim_func(private=True)
        def gemm(
            var_x: T.handle,
            w: T.Buffer((nblocks, k, BLOCK_N), wdtype),
            var_y: T.handle,
        ):
            T.func_attr(_kernel_attrs())
            m = T.int64()
            x = T.match_buffer(var_x, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            for task in T.parallel(nblocks * parts):
                panel_part(x, w, y, None, m, task // parts, task % parts)

    return gemm
