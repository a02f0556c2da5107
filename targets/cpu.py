"""The CPU through LLVM: this machine's (the default), or, cross-compiled, an aarch64 Linux CPU.

``--arch`` takes an LLVM CPU name of this machine's kind (default: this machine's CPU), or one of
another architecture's Linux CPUs: ``aarch64`` (LLVM's generic Armv8-A with NEON, which every 64-bit
Arm Linux machine runs) or an LLVM aarch64 CPU name, e.g. ``cortex-a76`` (Raspberry Pi 5),
``neoverse-n1`` / ``neoverse-v1`` (AWS Graviton2 / 3), ``cortex-a78ae`` (Jetson Orin). The TVM target
then names the ``mtriple`` (``aarch64-linux-gnu``), LLVM compiles for it, and PyPI ziglang's ``zig
cc`` links the library (codegen/cpu_cross_toolchain.py). The kernels pick their aarch64 blocking
and skip x86-only instructions by the target (codegen/kernels/cpu_isa.py).
"""

from __future__ import annotations

import os

from .base import TargetSpec

AARCH64 = "aarch64"
"""``--arch aarch64``: any aarch64 Linux CPU (LLVM's ``generic``: Armv8-A with NEON)."""

CROSS_TRIPLES = {AARCH64: "aarch64-linux-gnu"}
"""Architectures of other machines the target builds for -> their LLVM triple (Linux, glibc)."""

CROSS_CORES = 4
"""``num-cores`` of a cross-compiled target: the parallel granularity the kernels are built for (a
Raspberry Pi 5 has 4 cores); a device with more still runs the parallel loops on all of them."""

EXAMPLES = {AARCH64: "cortex-a76 (Raspberry Pi 5), neoverse-n1 / neoverse-v1 (AWS Graviton2 / 3), "
                     "cortex-a78ae (Jetson Orin)"}


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (``"native"`` silently means generic in TVM 0.27)."""
    import tvm.target.codegen
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_arch() -> str:
    """This machine's architecture, as its LLVM triple names it (``x86_64``, ``aarch64``)."""
    import tvm.target.codegen
    return str(tvm.target.codegen.llvm_get_system_triple()).split("-")[0]


def _is_host_cpu(arch: str) -> bool:
    import tvm.target.codegen
    return bool(tvm.target.codegen.llvm_is_valid_cpu(arch, str(tvm.target.codegen.llvm_get_system_triple())))


def cross_arch(arch: str | None) -> str | None:
    """The other architecture ``--arch`` builds for (``aarch64``); None for this machine's kind, or
    for an arch the target does not know (see :func:`check_cpu_arch`)."""
    if arch is None or _is_host_cpu(arch):
        return None
    import tvm.target.codegen
    for name, triple in CROSS_TRIPLES.items():
        if name == host_arch():
            continue
        if arch == name or (not arch.startswith("apple-") and tvm.target.codegen.llvm_is_valid_cpu(arch, triple)):
            return name
    return None


def cpu_target(arch: str | None) -> dict:
    """``arch``: an LLVM CPU name of this machine's kind (e.g. ``skylake-avx512``; default: this
    machine's CPU), ``aarch64``, or an aarch64 CPU name (e.g. ``cortex-a76``): that CPU's Linux."""
    cross = cross_arch(arch)
    if cross is None:
        return {"kind": "llvm", "mcpu": arch or host_cpu_name(), "num-cores": os.cpu_count() or 1}
    return {"kind": "llvm", "mtriple": CROSS_TRIPLES[cross], "mcpu": "generic" if arch == cross else arch,
            "num-cores": CROSS_CORES}


def check_cpu_arch(arch: str) -> str | None:
    """None if ``arch`` is an LLVM CPU of this machine's kind (LLVM itself would only warn and compile
    for a generic CPU), ``aarch64`` or an aarch64 Linux CPU; else a hint naming what is accepted."""
    if _is_host_cpu(arch) or cross_arch(arch) is not None:
        return None
    others = "; or ".join(f"`{name}` (any {name} Linux CPU) or an LLVM {name} CPU name, e.g. {EXAMPLES[name]}"
                          for name in CROSS_TRIPLES if name != host_arch())
    apple = (f" {arch} is an Apple CPU: for a Mac, build with --target metal (the cpu target builds Linux "
             "libraries)." if arch.startswith("apple-") else "")
    return (f"--arch takes an LLVM CPU name of this machine's kind, e.g. {host_cpu_name()} (this machine's "
            f"CPU, the default when --arch is left out){'; or ' + others if others else ''}.{apple}")


def _check_toolchain(arch: str | None) -> None:
    cross = cross_arch(arch)
    if cross is not None:
        from ..codegen.cpu_cross_toolchain import check_toolchain
        check_toolchain(cross)


def _package_library(executable, arch: str | None):
    cross = cross_arch(arch)
    if cross is None:
        return executable  # exported as is: linked by this machine's cc
    from ..codegen.cpu_cross_toolchain import CrossLibrary
    return CrossLibrary(executable, cross)


def _emit_linear(bb, x, w, bias, out_features=None):
    import tvm

    from ..codegen.kernels.cpu_linear import emit_linear
    return emit_linear(bb, x, w, bias, tvm.target.Target.current(), out_features=out_features)


def _emit_attention(bb, q, k, v, **shape):
    from ..codegen.kernels.cpu_attention import emit_attention
    return emit_attention(bb, q, k, v, **shape)


def _emit_quant_linear(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features):
    import tvm

    from ..codegen.kernels.cpu_quant_linear import emit_quant_linear
    return emit_quant_linear(bb, x, packed, scales, zeros, bias, scheme=scheme, out_features=out_features,
                             in_features=in_features, target=tvm.target.Target.current())


def _quant_linear_supports(scheme, out_features, in_features):
    import tvm

    from ..codegen.kernels.cpu_quant_linear import supports
    target = tvm.target.Target.current() or tvm.target.Target(cpu_target(None))
    return supports(scheme, out_features, in_features, target)


def _schedule_rules():
    from ..codegen.kernels.cpu_fallback import CPUFallback
    return [CPUFallback()]


def _linear_weight_layout():
    from ..codegen.kernels.cpu_quant_linear import STORED_LAYOUT
    return STORED_LAYOUT


TARGET = TargetSpec(
    name="cpu",
    description="this machine's CPU (LLVM), x86-64 or aarch64; or, cross-compiled, an aarch64 Linux CPU",
    device="cpu",
    library_file="model.so",
    tvm_target=cpu_target,
    device_needs="the TVM runtime (pip install apache-tvm), numpy, safetensors, tokenizers",
    emit_linear=_emit_linear,
    emit_attention=_emit_attention,
    emit_quant_linear=_emit_quant_linear,
    quant_linear_supports=_quant_linear_supports,
    schedule_rules=_schedule_rules,
    linear_weight_layout=_linear_weight_layout,
    check_free_arch=check_cpu_arch,
    arch_help="an LLVM CPU name of this machine's kind, e.g. skylake-avx512 (default: this machine's CPU); "
              "or, cross-compiled for Linux on another architecture: aarch64 (any aarch64 CPU) or an "
              f"aarch64 CPU name, e.g. {EXAMPLES[AARCH64]}",
    build_needs="for another architecture's CPU (aarch64): ziglang (pip install ziglang), which links its "
                "library",
    check_toolchain=_check_toolchain,
    package_library=_package_library,
    dtypes=("fp32", "fp16"),
    fp16_activations=False,  # f16 weights widened in the linear kernels; x86 has no fast f16 arithmetic
    int8_activations=True,  # VNNI vpdpbusd where the CPU has it, portable int32 code elsewhere (cpu_w4a8_linear.py)
    compact_sparse=True,  # decode gathers x per kept value, prefill's sparse GEMM (cpu_sparse_linear.py)
)
