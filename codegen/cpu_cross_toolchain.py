"""Link the CPU target's library for a CPU of another architecture than this machine's (aarch64
Linux, built on x86-64), with PyPI ``ziglang``'s ``zig cc``, as codegen/metal_toolchain.py links the
Metal dylib: no cross compiler, no sysroot.

TVM's LLVM compiles the code for the target's ``mtriple`` itself; only the link needs a toolchain of
that architecture. TVM's ``export_library`` writes the object files and calls an ``fcompile`` to
link them: ``fcompile`` here runs ``python -m ziglang cc -target aarch64-linux-gnu.2.17 -shared``
(glibc 2.17, aarch64's first: the library loads on every aarch64 glibc Linux). The TVM runtime
symbols the library calls stay undefined and resolve when the runtime loads it, as with this
machine's ``cc -shared``.
"""

from __future__ import annotations

import subprocess

from ..errors import LLMOptError
from .metal_toolchain import ZIG, zig_version, ziglang_installed

ZIG_TARGETS = {"aarch64": "aarch64-linux-gnu.2.17"}
"""Architecture (an LLVM triple's first part) -> zig's target for its Linux shared library."""

TRIPLES = {"aarch64": "aarch64-linux-gnu"}
"""Architecture -> the LLVM triple TVM compiles for."""


def zig_hint(arch: str) -> str:
    return (f"Install ziglang: `pip install ziglang` (its `zig cc` links the {arch} Linux library); "
            "or build for this machine's CPU (leave out --arch).")


def check_toolchain(arch: str) -> None:
    """An LLMOptError naming what to install unless PyPI ziglang is there and runs (``arch``: the
    architecture linked for, e.g. ``aarch64``)."""
    if not ziglang_installed():
        raise LLMOptError(f"target cpu: PyPI ziglang was not found; its `zig cc` links the {arch} Linux "
                          "library at build time.", zig_hint(arch))
    if zig_version() is None:
        raise LLMOptError(f"target cpu: `{' '.join(ZIG)} version` does not run.", zig_hint(arch))


def linker(arch: str):
    """TVM ``export_library``'s ``fcompile`` linking objects into an ``arch`` Linux shared library."""
    zig_target = ZIG_TARGETS[arch]

    def link_shared(output: str, objects: list[str], options=None, **_) -> None:
        command = [*ZIG, "cc", "-target", zig_target, "-shared", "-o", output, *objects]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"zig cc failed to link the {arch} library:\n{result.stdout}{result.stderr}")

    return link_shared


class CrossLibrary:
    """The compiled module as a cross-built CPU artifact stores it: ``export_library(path)`` writes
    the ``arch`` Linux shared library."""

    def __init__(self, executable, arch: str):
        self.executable = executable
        self.arch = arch

    def export_library(self, path: str, **_) -> None:
        self.executable.export_library(str(path), fcompile=linker(self.arch))
