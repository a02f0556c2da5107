"""Compile CUDA kernels at build time into one multi-arch fatbin, on a machine with no GPU.

TVM turns CUDA kernels into a binary only when its CUDA runtime (``libtvm_runtime_cuda.so``) is
loaded, and that library links against the driver, ``libcuda.so.1``. Without a driver TVM keeps
the CUDA source in the library, and the device would need a compiler. So a build:

1. checks, before any model work, that ``nvcc`` is installed and knows every requested arch
   (``check_toolchain``: an ``LLMOptError`` naming what to install otherwise);
2. when no driver can be loaded, compiles a stub ``libcuda.so.1`` (the few ``cu*`` symbols TVM's
   CUDA runtime links against, every one failing with CUDA_ERROR_NO_DEVICE) with the host C
   compiler into a cache folder and loads it ``RTLD_GLOBAL``, then loads TVM's CUDA runtime
   (a real driver, when there is one, is used as it is);
3. registers ``tvm_callback_cuda_compile`` (around ``tvm.compile`` only; ``compile_context``), which
   runs ``nvcc --fatbin -gencode arch=compute_XX,code=sm_XX ...`` for every requested arch and
   returns the fatbin that TVM embeds in the library.

The device then needs the driver and TVM's runtime, no compiler. The stub is never used to run
anything: with it, ``tvm.cuda().exist`` is False, as on any machine without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import LLMOptError

NVCC_HINT = ("Install nvcc: `pip install nvidia-cuda-nvcc` or the CUDA toolkit (13.0 or newer; put its bin/ "
             "on PATH or set CUDA_HOME), or build for another target, e.g. --target cpu.")
CUDA_HOMES = ("/usr/local/cuda",)  # where a toolkit usually lives, searched after PATH and CUDA_HOME
NVCC_OPTIONS = ("-O3", "--expt-relaxed-constexpr", "--threads", "0")  # no --use_fast_math: CPU-equal numerics

# The symbols libtvm_runtime_cuda.so (apache-tvm 0.27) takes from libcuda.so.1, each failing as with no device.
_STUB_SOURCE = r"""/* llmopt's build-time stand-in for libcuda.so.1: lets TVM's CUDA runtime load on a machine
   without a driver so that kernels are compiled at build time. Every call fails with no device. */
typedef int CUresult;
enum { CUDA_ERROR_NO_DEVICE = 100 };
CUresult cuGetErrorName(CUresult error, const char **name) { *name = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = "no CUDA driver (llmopt build-time stub of libcuda.so.1)"; return 0; }
CUresult cuDeviceGetName(char *name, int length, int device) { return CUDA_ERROR_NO_DEVICE; }
CUresult cuFuncSetAttribute(void *function, int attribute, int value) { return CUDA_ERROR_NO_DEVICE; }
CUresult cuLaunchKernelEx(const void *config, void *function, void **params, void **extra) {
  return CUDA_ERROR_NO_DEVICE; }
CUresult cuModuleGetFunction(void **function, void *module, const char *name) { return CUDA_ERROR_NO_DEVICE; }
CUresult cuModuleLoadData(void **module, const void *image) { return CUDA_ERROR_NO_DEVICE; }
CUresult cuModuleUnload(void *module) { return CUDA_ERROR_NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void) { return CUDA_ERROR_NO_DEVICE; }
"""


def arch_number(arch: str) -> int:
    """``sm_90`` -> 90."""
    return int(arch.removeprefix("sm_"))


def find_nvcc() -> Path | None:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH, else from pip's nvidia-cuda-nvcc, else in a
    usual toolkit folder; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + _pip_nvcc_homes() + list(CUDA_HOMES)
    for home in filter(None, homes):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            return nvcc
    return None


def _pip_nvcc_homes() -> list[str]:
    """Folders of pip's nvidia-cuda-nvcc wheels (``nvidia/cuda_nvcc``, ``nvidia/cu13``) holding bin/nvcc."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [str(p.parent.parent) for root in spec.submodule_search_locations
            for p in sorted(Path(root).glob("*/bin/nvcc"))]


def find_c_compiler() -> str | None:
    """The host C compiler (for the driver stub; nvcc needs one too)."""
    return shutil.which("gcc") or shutil.which("cc")


@functools.lru_cache(maxsize=None)
def nvcc_archs(nvcc: Path) -> tuple[str, ...]:
    """The virtual archs ``nvcc --list-gpu-arch`` prints (``compute_75``, ...)."""
    try:
        out = subprocess.run([str(nvcc), "--list-gpu-arch"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise LLMOptError(f"nvcc at {nvcc} does not run ({err}).", NVCC_HINT) from None
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("compute_"))


def check_toolchain(archs: tuple[str, ...]) -> Path:
    """The nvcc to use for ``archs`` (``sm_XX``); an LLMOptError naming what to install when there is
    no nvcc, no host C compiler, or an nvcc that does not know one of the archs."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise LLMOptError("target cuda: nvcc (the CUDA compiler) was not found on PATH, under CUDA_HOME, "
                          "in pip's nvidia-cuda-nvcc or in /usr/local/cuda; the CUDA kernels are compiled at "
                          "build time.", NVCC_HINT)
    if find_c_compiler() is None:
        raise LLMOptError("target cuda: no host C compiler (gcc or cc) was found; nvcc needs one.",
                          "Install gcc (e.g. `apt-get install gcc g++`) and put it on PATH.")
    known = nvcc_archs(nvcc)
    unknown = [a for a in archs if f"compute_{arch_number(a)}" not in known]
    if unknown:
        raise LLMOptError(f"target cuda: nvcc at {nvcc} cannot compile for {', '.join(unknown)} "
                          f"(it knows {', '.join(k.replace('compute_', 'sm_') for k in known)}).",
                          "Leave those archs out of --arch, or install a newer CUDA toolkit (nvcc).")
    return nvcc


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmopt" / "cuda-driver-stub"


def _build_stub() -> Path:
    """``libcuda.so.1`` compiled from ``_STUB_SOURCE`` into the cache (once per source text)."""
    digest = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:16]
    for folder in (_cache_dir() / digest, Path(tempfile.gettempdir()) / f"llmopt-cuda-driver-stub-{digest}"):
        library = folder / "libcuda.so.1"
        if library.is_file():
            return library
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        source, partial = folder / "stub.c", folder / f"libcuda.so.1.partial-{os.getpid()}"
        source.write_text(_STUB_SOURCE)
        compiler = find_c_compiler()
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(partial),
                                 str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise LLMOptError(f"target cuda: compiling the driver stub with {compiler} failed:\n{result.stderr}",
                              "Check that gcc works (e.g. `apt-get install gcc`).")
        os.replace(partial, library)  # atomic: a concurrent build sees the old state or a complete library
        return library
    raise LLMOptError(f"target cuda: no writable folder for the driver stub ({_cache_dir()}).",
                      "Set XDG_CACHE_HOME to a writable folder.")


@functools.lru_cache(maxsize=None)
def load_cuda_runtime() -> str:
    """Make TVM's CUDA runtime loadable and loaded; returns "driver" or the stub's path.

    A real ``libcuda.so.1`` is used when one loads; else the stub is built and loaded globally.
    """
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        driver = "driver"
    except OSError:
        stub = _build_stub()
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        driver = str(stub)
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" not in _LOADED_LIBS:  # `import tvm` skipped it: there was no libcuda.so.1 then
        from tvm_ffi.libinfo import load_lib_ctypes
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    return driver


def compile_fatbin(nvcc: Path, code: str, archs: tuple[str, ...]) -> bytes:
    """nvcc's fatbin of CUDA source ``code`` with SASS (an ELF cubin) for each of ``archs``."""
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{arch_number(a)},code=sm_{arch_number(a)}")]
    with tempfile.TemporaryDirectory(prefix="llmopt-nvcc-") as tmp:
        source, fatbin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        source.write_text(code)
        result = subprocess.run([str(nvcc), "--fatbin", *NVCC_OPTIONS, *gencode, "-o", str(fatbin), str(source)],
                                capture_output=True, text=True)
        if result.returncode != 0:  # generated code that does not compile: an llmopt (or TVM) bug
            raise RuntimeError(f"nvcc failed on the generated CUDA kernels ({source.name}):\n"
                               f"{result.stdout}{result.stderr}")
        return fatbin.read_bytes()


@contextlib.contextmanager
def compile_context(archs: tuple[str, ...]):
    """Around ``tvm.compile`` for a CUDA target: CUDA kernels become one fatbin for ``archs``.

    Raises RuntimeError afterwards if TVM did not call the compiler (it would have kept source).
    """
    import tvm.support.nvcc  # noqa: F401  (registers TVM's own callback first, so that ours overrides it)
    import tvm_ffi

    nvcc = check_toolchain(archs)
    load_cuda_runtime()
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    calls = []

    def compile_cuda(code, *_):
        calls.append(len(code))
        return compile_fatbin(nvcc, code, archs)

    tvm_ffi.register_global_func(name, compile_cuda, override=True)
    try:
        yield calls
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
    if not calls:
        raise RuntimeError("TVM did not call the CUDA compile callback: the library would carry CUDA source "
                           "instead of a fatbin (is TVM's CUDA runtime loaded?)")
