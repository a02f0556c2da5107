"""NVIDIA GPUs through CUDA: kernels compiled at build time into one multi-arch fatbin.

``--arch sm_80,sm_90`` builds one library with SASS for each arch (a GPU runs the SASS of its own
major version with the highest minor not above its own: sm_80 covers sm_86 and sm_89). TVM
generates the kernels once, for the lowest arch, so they are valid on every one of them. The
build needs nvcc and a host C compiler (codegen/cuda_toolchain.py), not a GPU; the device needs
the driver and TVM's runtime, not a compiler.

A linear is one TE compute reading the weight as stored, ``[N, K]`` (an NT matmul; Relax's
``linear`` would transpose each weight into a new buffer on every call), and a quantized linear the
same with the dequantize inlined for decode, which dlight's GEMV rule schedules, and for prefill the
weight's dequantize kernel, then the NT matmul, which its Matmul rule tiles (codegen/kernels/
gpu_linear.py, quant_linear_te.py). The rest is legalized Relax,
scheduled by TVM's dlight GPU rules. Weights stay in the IR's layout.
"""

from __future__ import annotations

from . import gpu
from .base import TargetSpec, requested_archs

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
DEFAULT_ARCHS = ("sm_75", "sm_80", "sm_90", "sm_100", "sm_120")  # one per major version: every GPU from Turing
HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}  # the host code: any x86-64 Linux machine
SHARED_MEMORY = 49152  # bytes per block every arch gives without opting in to more


def _archs(arch: str | None) -> tuple[str, ...]:
    return requested_archs(TARGET, arch)


def cuda_target(arch: str | None) -> dict:
    """TVM's target: the lowest requested arch (code valid for all of them), an x86-64 Linux host."""
    lowest = min(_archs(arch), key=lambda a: int(a.removeprefix("sm_")))
    return {"kind": "cuda", "arch": lowest, "max_shared_memory_per_block": SHARED_MEMORY, "host": dict(HOST)}


_check_toolchain, _compile_context = gpu.arch_toolchain("cuda_toolchain", lambda arch: _archs(arch))


TARGET = TargetSpec(
    name="cuda",
    description="NVIDIA GPUs (CUDA): kernels precompiled by nvcc into one multi-arch fatbin, x86-64 Linux host",
    device="cuda",
    library_file="model.so",
    tvm_target=cuda_target,
    device_needs="an NVIDIA GPU of a built arch with its driver, R580 or newer (CUDA 13), and the TVM runtime "
                 "(pip install apache-tvm, whose libtvm_runtime_cuda loads the fatbin; no CUDA toolkit)",
    arch_help=f"{', '.join(ARCHS)}; several comma-separated, e.g. sm_80,sm_90 (default: {','.join(DEFAULT_ARCHS)}); "
              "a GPU runs SASS of its major version and a lower minor (sm_80 covers sm_86 and sm_89)",
    build_needs="nvcc (pip install nvidia-cuda-nvcc, or the CUDA toolkit) and gcc; no GPU",
    archs=ARCHS,
    multi_arch=True,
    default_archs=DEFAULT_ARCHS,
    check_toolchain=_check_toolchain,
    compile_context=_compile_context,
    **gpu.shared_fields(),
)
