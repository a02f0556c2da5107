"""AMD GPUs through ROCm: kernels compiled at build time into AMDGPU code objects, one per arch.

``--arch gfx90a,gfx942`` builds one library (x86-64 Linux host) that carries a code object for each
arch, in one clang offload bundle (codegen/rocm_toolchain.py); HIP loads the one of the GPU's arch.
An AMD code object runs only on its own arch. The kernels are scheduled once, for all requested archs,
and code-generated per arch: warps are 64 lanes when every arch runs wave64 (gfx9: CDNA), else 32
(valid on wave64 and wave32 GPUs alike; RDNA runs wave32). The kernels are the CUDA target's (an NT
matmul per linear; a quantized one dequantizes inside the decode GEMV and as its own kernel before
prefill's tiled matmul; TVM's dlight GPU rules for the rest).

The build needs Debian's rocm-device-libs (or a ROCm install) and an ld.lld of LLVM 22 or newer
(PyPI ziglang), no GPU; the device needs a TVM runtime built with ROCm.
"""

from __future__ import annotations

from . import gpu
from .base import TargetSpec, requested_archs

ARCHS = ("gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100")  # MI100, MI200, MI300; RDNA2, RDNA3 (RX 7900)
DEFAULT_ARCHS = ("gfx90a", "gfx942")
HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}  # the host code: any x86-64 Linux machine


def _archs(arch: str | None) -> tuple[str, ...]:
    return requested_archs(TARGET, arch)


def rocm_target(arch: str | None) -> dict:
    """TVM's target: the first requested arch (each other gets the same kernels, code-generated for it),
    warps that every requested arch runs, an x86-64 Linux host."""
    from ..codegen.rocm_toolchain import wavefront_size
    archs = _archs(arch)
    warp = min(wavefront_size(a) for a in archs)
    return {"kind": "rocm", "mcpu": archs[0], "thread_warp_size": warp, "host": dict(HOST)}


_check_toolchain, _compile_context = gpu.arch_toolchain("rocm_toolchain", lambda arch: _archs(arch))


TARGET = TargetSpec(
    name="rocm",
    description="AMD GPUs (ROCm): AMDGPU code objects for each arch, bundled in one library, x86-64 Linux host",
    device="rocm",
    library_file="model.so",
    tvm_target=rocm_target,
    device_needs="an AMD GPU of a built arch with ROCm (its runtime must load AMDGPU code object v6) and a TVM "
                 "runtime built with ROCm (USE_ROCM=ON, TVM 0.27; the PyPI apache-tvm wheel for Linux has no ROCm "
                 "runtime); no compiler",
    arch_help=f"{', '.join(ARCHS)}; several comma-separated, e.g. gfx90a,gfx942 (default: {','.join(DEFAULT_ARCHS)}); "
              "a code object runs only on its own arch",
    build_needs="the ROCm device libraries (apt-get install rocm-device-libs), an ld.lld of LLVM 22 or newer "
                "(pip install ziglang) and gcc; no GPU",
    archs=ARCHS,
    multi_arch=True,
    default_archs=DEFAULT_ARCHS,
    check_toolchain=_check_toolchain,
    compile_context=_compile_context,
    **gpu.shared_fields(),
)
