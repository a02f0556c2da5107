"""Build a Metal library for Apple silicon Macs on any machine: MSL source kernels and an arm64
macOS host part, linked into a ``.dylib`` by PyPI ``ziglang`` (no Xcode, no Mac).

TVM's Metal code generator keeps the kernels as Metal Shading Language source (the Metal runtime
compiles it when the library is loaded); the host code is LLVM's arm64 macOS objects. TVM's
``export_library`` writes those objects and the packed kernels as object files and calls an
``fcompile`` to link them: ``fcompile`` here runs ``python -m ziglang cc -target aarch64-macos.11.0
-shared -Wl,-undefined,dynamic_lookup`` (TVM links the same way on macOS: the TVM runtime symbols
resolve when the runtime loads the library), with an install name that does not depend on where the
build wrote the file (reproducible). zig's linker signs the dylib ad hoc, as arm64 macOS requires.

dlight's Matmul rule tries Metal's simdgroup schedule on every matmul (it applies to float16 only in
TVM 0.27), which imports TVM's tensor intrinsics: ``compile_context`` imports them first, fast.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

from ..errors import LLMOptError

ZIG = (sys.executable, "-m", "ziglang")
MACOS = "aarch64-macos.11.0"  # arm64 macOS 11 (the first with Apple silicon) and later
ZIG_HINT = "Install ziglang: `pip install ziglang` (it links the arm64 macOS library); or build for another target."


@functools.lru_cache(maxsize=None)
def zig_version() -> str | None:
    """``zig version`` of PyPI ziglang; None when it does not run."""
    try:
        out = subprocess.run([*ZIG, "version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def ziglang_installed() -> bool:
    return importlib.util.find_spec("ziglang") is not None


def check_toolchain() -> None:
    """An LLMOptError naming what to install unless PyPI ziglang is there and runs."""
    if not ziglang_installed():
        raise LLMOptError("target metal: PyPI ziglang was not found; its `zig cc` links the arm64 macOS library "
                          "at build time.", ZIG_HINT)
    if zig_version() is None:
        raise LLMOptError(f"target metal: `{' '.join(ZIG)} version` does not run.", ZIG_HINT)


def link_dylib(output: str, objects: list[str], options=None, **_) -> None:
    """TVM ``export_library``'s ``fcompile``: link ``objects`` into the arm64 macOS dylib ``output``."""
    command = [*ZIG, "cc", "-target", MACOS, "-shared", "-Wl,-undefined,dynamic_lookup",
               f"-Wl,-install_name,@rpath/{Path(output).name}", "-o", output, *objects]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"zig cc failed to link the Metal library:\n{result.stdout}{result.stderr}")


class MetalLibrary:
    """The compiled module as a Metal artifact stores it: ``export_library(path)`` writes the dylib."""

    def __init__(self, executable):
        self.executable = executable

    def export_library(self, path: str, **_) -> None:
        self.executable.export_library(str(path), fcompile=link_dylib)


@contextlib.contextmanager
def _fast_frame_inspection():
    """``inspect.getmodule`` answering None at once for frames of no file (``<frozen ...>``), as it
    ends up doing after scanning every module in ``sys.modules``, on every call.

    TVMScript's ``prim_func`` calls ``inspect.stack()``, which looks up the module of every frame;
    importing ``tvm.s_tir.tensor_intrin`` (hundreds of them, under import frames) so took 80 s with
    torch loaded, 6 s like this.
    """
    original = inspect.getmodule

    def getmodule(obj, _filename=None):
        if _filename is not None and _filename.startswith("<") and _filename.endswith(">"):
            return None
        return original(obj, _filename)

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = original


def import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (dlight's Metal matmul rule needs the simdgroup ones), fast."""
    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        with _fast_frame_inspection():
            import tvm.s_tir.tensor_intrin  # noqa: F401


@contextlib.contextmanager
def compile_context():
    """Around ``tvm.compile`` for Metal: the toolchain checked, the tensor intrinsics imported."""
    check_toolchain()
    import_tensor_intrinsics()
    yield
