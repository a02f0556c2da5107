"""What the CPU kernels need to know of the target's vector unit: x86 or aarch64 (NEON).

The kernels were written for x86 with AVX-512: 32 registers of 16 f32 lanes, so a ``BLOCK_N = 64``
column accumulator row is 4 registers and a GEMM tile of 6 such rows (24 registers) stays in
registers. NEON has 32 registers of 4 f32 lanes: the same 64 columns take 16 registers. The stored
weight layout (64-column blocks) is the same for both; what changes on aarch64 is how many 64-column
accumulator rows a kernel keeps live, cut so that they fit in NEON's registers with room for the
loaded weights (one GEMM row, one GEMV partial sum: 16 registers, which are also 16 independent FMA
chains, enough to hide FMA latency), and the width the fallback schedule vectorizes by.

x86-only instructions (VNNI ``vpdpbusd``, ``vpermps``, ``vpermi2ps``) are gated by the target's LLVM
features in their kernels (``avx512vnni``, ``avx512f``), which an aarch64 CPU never has: there the
portable code runs (int8 linears: shifts and int32 multiply-adds; NF4 and N:M-sparse linears: the
generic dequantize / densify, then the fp32 kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm


@dataclass(frozen=True)
class VectorUnit:
    """The kernel parameters that depend on the vector registers."""

    name: str
    gemm_rows: int  # rows of x per GEMM register tile (rows x 64 f32 accumulators), at most 7
    gemv_split: int  # partial sums per 64-column output row in the fp32 GEMV
    quant_partial_sums: int  # partial sums per 64-column output row in the quantized GEMV
    fallback_lanes: int  # f32 lanes of one register: what the fallback schedule vectorizes by


X86 = VectorUnit("x86 (AVX-512 blocking)", gemm_rows=6, gemv_split=4, quant_partial_sums=2, fallback_lanes=16)
"""Every x86 CPU (the blocking is AVX-512's; an AVX2 CPU runs the same code)."""

NEON = VectorUnit("aarch64 NEON", gemm_rows=1, gemv_split=1, quant_partial_sums=1, fallback_lanes=4)
"""aarch64: one 64-column row of accumulators (16 of the 32 NEON registers) per tile."""


def target_arch(target: tvm.target.Target | None) -> str | None:
    """The architecture an llvm target compiles for (``x86_64``, ``aarch64``, ...): its ``mtriple``'s,
    else this machine's; None for other targets or none."""
    if target is None or target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple") or "") or str(tvm.target.codegen.llvm_get_system_triple())
    return triple.split("-")[0]


def vector_unit(target: tvm.target.Target | None) -> VectorUnit:
    """The vector unit the CPU kernels are blocked for on ``target`` (x86 unless it is aarch64)."""
    return NEON if target_arch(target) == "aarch64" else X86
