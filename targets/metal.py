"""Apple silicon GPUs through Metal: MSL kernels and an arm64 macOS host, in one ``model.dylib``.

The kernels are Metal Shading Language source, which the Metal runtime compiles when the library
is loaded, so one artifact serves every Apple silicon GPU; ``--arch`` (m1 .. m4, default m1) only
names the CPU the small host part is compiled for (a newer Mac runs an older one's code). The
library is linked on any machine with PyPI ziglang (codegen/metal_toolchain.py), no Xcode. The
kernels are the CUDA target's (an NT matmul per linear; a quantized one dequantizes inside the
decode GEMV and as its own kernel before prefill's tiled matmul), scheduled by TVM's dlight GPU rules (the Matmul rule uses simdgroup matrices on Metal).
"""

from __future__ import annotations

from . import gpu
from .base import TargetSpec

ARCHS = ("m1", "m2", "m3", "m4")
# TVM's apple/m1-gpu tag (every Apple silicon GPU): 32-wide SIMD groups, 32 KiB threadgroup memory
GPU = {"max_threads_per_block": 1024, "max_num_threads": 256, "thread_warp_size": 32,
       "max_shared_memory_per_block": 32768, "max_function_args": 31}


def metal_target(arch: str | None) -> dict:
    """TVM's target: Metal kernels, an arm64 macOS host for ``arch``'s CPU (default m1)."""
    return {"kind": "metal", **GPU, "host": {"kind": "llvm", "mtriple": "arm64-apple-macos",
                                             "mcpu": f"apple-{arch or 'm1'}"}}


def _check_toolchain(arch: str | None) -> None:
    from ..codegen.metal_toolchain import check_toolchain
    check_toolchain()


def _compile_context(arch: str | None):
    from ..codegen.metal_toolchain import compile_context
    return compile_context()


def _package_library(executable, arch: str | None):
    from ..codegen.metal_toolchain import MetalLibrary
    return MetalLibrary(executable)  # exported as a dylib linked by zig cc


TARGET = TargetSpec(
    name="metal",
    description="Apple silicon GPUs (Metal): MSL kernels compiled at load, arm64 macOS host, one .dylib",
    device="metal",
    library_file="model.dylib",
    tvm_target=metal_target,
    device_needs="a Mac with Apple silicon (arm64 macOS 11 or later) and the TVM runtime for macOS "
                 "(pip install apache-tvm==0.27.0.post1 'apache-tvm-ffi<0.1.15', whose Metal runtime compiles "
                 "the kernels at load); no Xcode",
    archs=ARCHS,
    default_archs=("m1",),
    arch_help="m1, m2, m3, m4: the CPU of the host code (default m1, which every Apple silicon Mac runs); "
              "the kernels are the same for every Apple GPU",
    build_needs="ziglang (pip install ziglang), which links the arm64 macOS library; no Mac, no Xcode",
    check_toolchain=_check_toolchain,
    compile_context=_compile_context,
    package_library=_package_library,
    **gpu.shared_fields(),
)
