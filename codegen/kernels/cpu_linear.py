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
from functools import reduce

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

BLOCK_N = 64
"""Output channels per packed weight block: four AVX-512 vectors of fp32."""

GEMM_ROWS = 6
"""Rows of x per GEMM register tile: 6 x 64 fp32 = 24 accumulator zmm registers (<= 8:
the remainder rows are covered by 4-, 2- and 1-row tiles)."""

GEMV_SPLIT_K = 4
"""Independent partial sums per output vector in the GEMV, to hide FMA latency."""

_OPAQUE = 8  # relax OpPatternKind.kOpaque


@dataclass(frozen=True)
class PackedWeightLayout:
    """The stored layout of a linear weight: ``[ceil(N / block), K, block]``, zero-padded.

    ``w_packed[nb, k, j] = W[nb * block + j, k]`` for the PyTorch weight ``W[N, K]``.
    """

    block: int

    def packed_shape(self, n: int, k: int) -> tuple[int, int, int]:
        """Shape of the packed weight for ``W[n, k]``."""
        return (-(-n // self.block), k, self.block)

    def pack(self, w: np.ndarray) -> np.ndarray:
        """Pack a PyTorch-layout weight ``[N, K]``."""
        n, k = w.shape
        nblocks = -(-n // self.block)
        padded = np.zeros((nblocks * self.block, k), dtype=w.dtype)
        padded[:n] = w
        return np.ascontiguousarray(padded.reshape(nblocks, self.block, k).transpose(0, 2, 1))

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
        num_threads = len(os.sched_getaffinity(0))
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

    A constant M of 1 selects the GEMV kernel, anything else the tiled GEMM.
    """
    del target  # one set of kernels for every llvm target; kept for the dispatcher interface
    x_shape = _static_or_symbolic_shape(x)
    k = int(x_shape[-1])
    n, w_packed = _packed_weight(bb, w, bias, k, out_features)
    rows = _product(x_shape[:-1])
    x2d = x if len(x_shape) == 2 else bb.emit(relax.op.reshape(x, [rows, k]))

    is_gemv = isinstance(rows, int) and rows == 1
    kind = "gemv" if is_gemv else "gemm"
    has_bias = bias is not None
    func = (make_gemv if is_gemv else make_gemm)(n, k, has_bias)
    gv = bb.add_func(func, f"linear_{kind}_n{n}_k{k}{'_bias' if has_bias else ''}")
    args = [x2d, w_packed] + ([bias] if has_bias else [])
    y2d = bb.emit(relax.call_tir(gv, args, relax.TensorType([rows, n], "float32")))
    if len(x_shape) == 2:
        return y2d
    return bb.emit(relax.op.reshape(y2d, list(x_shape[:-1]) + [n]))


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
    if ty.dtype != "float32":
        raise NotImplementedError(f"cpu linear kernels are fp32 only, got {ty.dtype}")
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


def make_gemv(n: int, k: int, has_bias: bool) -> tirx.PrimFunc:
    """The M == 1 kernel: ``y[1, n] = x[1, k] @ W^T (+ bias)`` on the packed weight.

    Schedule: parallel over N blocks (each thread streams a contiguous part of the
    weight); per block, ``GEMV_SPLIT_K`` interleaved k streams accumulate into separate
    ``BLOCK_N``-wide vectors (4 x 4 zmm independent FMA chains, enough to keep the loads
    in flight), summed once at the end.
    """
    nblocks, nb, split = -(-n // BLOCK_N), BLOCK_N, GEMV_SPLIT_K
    k_main = k // split * split
    store_row = _row_store(n, has_bias)

    @T.macro
    def block_dot(x, w, y, b, jo):
        acc = T.alloc_buffer((split, nb), "float32", scope="local")
        for s in T.unroll(split):
            for j in T.vectorized(nb):
                acc[s, j] = T.float32(0)
        for ko in range(k_main // split):
            for s in T.unroll(split):
                for j in T.vectorized(nb):
                    acc[s, j] = acc[s, j] + x[0, ko * split + s] * w[jo, ko * split + s, j]
        for kt in range(k - k_main):
            for j in T.vectorized(nb):
                acc[0, j] = acc[0, j] + x[0, k_main + kt] * w[jo, k_main + kt, j]
        for s in T.unroll(1, split):
            for j in T.vectorized(nb):
                acc[0, j] = acc[0, j] + acc[s, j]
        store_row(y, b, acc, 0, 0, jo)

    if has_bias:

        @T.prim_func(private=True)
        def gemv(
            x: T.Buffer((1, k), "float32"),
            w: T.Buffer((nblocks, k, nb), "float32"),
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
            w: T.Buffer((nblocks, k, nb), "float32"),
            y: T.Buffer((1, n), "float32"),
        ):
            T.func_attr(_kernel_attrs())
            for jo in T.parallel(nblocks):
                block_dot(x, w, y, None, jo)

    return gemv


def make_gemm(n: int, k: int, has_bias: bool) -> tirx.PrimFunc:
    """The general kernel for symbolic M: ``y[m, n] = x[m, k] @ W^T (+ bias)``.

    Schedule: parallel over N blocks; per block, the packed ``K x BLOCK_N`` weight panel
    stays in L2 while the row tiles of x sweep over it. A ``GEMM_ROWS x BLOCK_N`` register
    tile accumulates over all of K (one broadcast of x and one ``BLOCK_N`` vector load per
    row and k), then is stored once with the bias added. The ``m % GEMM_ROWS`` remaining
    rows use 4-, 2- and 1-row tiles of the same code (binary decomposition).
    """
    nblocks, nb, mr = -(-n // BLOCK_N), BLOCK_N, GEMM_ROWS
    store_row = _row_store(n, has_bias)

    @T.macro
    def tile(x, w, y, b, jo, row0, rows):
        acc = T.alloc_buffer((rows, nb), "float32", scope="local")
        for i in T.unroll(rows):
            for j in T.vectorized(nb):
                acc[i, j] = T.float32(0)
        for kk in range(k):
            for i in T.unroll(rows):
                for j in T.vectorized(nb):
                    acc[i, j] = acc[i, j] + x[row0 + i, kk] * w[jo, kk, j]
        for i in T.unroll(rows):
            store_row(y, b, acc, i, row0 + i, jo)

    @T.macro
    def panel(x, w, y, b, m, jo):
        for mo in range(m // mr):
            tile(x, w, y, b, jo, mo * mr, mr)
        # Remainder rows r = m % mr (< 8) as tiles of 4, 2, 1 rows: the t-row tile runs when
        # bit t of r is set, after the larger tiles, i.e. at (r // 2t) * 2t past the full tiles.
        if m % mr // 4 % 2 == 1:
            tile(x, w, y, b, jo, m // mr * mr, 4)
        if m % mr // 2 % 2 == 1:
            tile(x, w, y, b, jo, m // mr * mr + m % mr // 4 * 4, 2)
        if m % mr % 2 == 1:
            tile(x, w, y, b, jo, m // mr * mr + m % mr // 2 * 2, 1)

    if has_bias:

        @T.prim_func(private=True)
        def gemm(
            var_x: T.handle,
            w: T.Buffer((nblocks, k, nb), "float32"),
            b: T.Buffer((n,), "float32"),
            var_y: T.handle,
        ):
            T.func_attr(_kernel_attrs())
            m = T.int64()
            x = T.match_buffer(var_x, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            for jo in T.parallel(nblocks):
                panel(x, w, y, b, m, jo)

    else:

        @T.prim_func(private=True)
        def gemm(
            var_x: T.handle,
            w: T.Buffer((nblocks, k, nb), "float32"),
            var_y: T.handle,
        ):
            T.func_attr(_kernel_attrs())
            m = T.int64()
            x = T.match_buffer(var_x, (m, k), "float32")
            y = T.match_buffer(var_y, (m, n), "float32")
            for jo in T.parallel(nblocks):
                panel(x, w, y, None, m, jo)

    return gemm


def _row_store(n: int, has_bias: bool):
    """A macro storing accumulator row ``i`` to ``y[row, block jo]``, adding the bias.

    When N is a multiple of BLOCK_N the store is one unguarded vector store; otherwise the
    last block is partial and every element store is guarded by ``col < n``.
    """
    nb = BLOCK_N
    guarded = n % nb != 0

    @T.macro
    def store_row(y, b, acc, i, row, jo):
        if guarded:
            for j in range(nb):
                if jo * nb + j < n:
                    if has_bias:
                        y[row, jo * nb + j] = acc[i, j] + b[jo * nb + j]
                    else:
                        y[row, jo * nb + j] = acc[i, j]
        else:
            for j in T.vectorized(nb):
                if has_bias:
                    y[row, jo * nb + j] = acc[i, j] + b[jo * nb + j]
                else:
                    y[row, jo * nb + j] = acc[i, j]

    return store_row
