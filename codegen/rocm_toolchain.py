"""Compile ROCm kernels at build time into AMDGPU code objects for several archs, with no GPU.

TVM (0.27) generates AMDGPU code for one arch per target (``mcpu``): LLVM compiles the kernels
with the ROCm device libraries' bitcode into an object file, and ``ld.lld`` links it into a code
object (hsaco), which TVM embeds in the library. For several archs, a build:

1. checks, before any model work, that the device-library bitcode (Debian's ``rocm-device-libs``,
   or a ROCm install) and an ``ld.lld`` of LLVM 22 or newer are there (``check_toolchain``; Debian's
   lld-16 rejects LLVM 22's code object v6, PyPI ``ziglang`` ships LLD 22): an ``LLMOptError``
   naming what to install otherwise;
2. around ``tvm.compile`` (``compile_context``), wraps TVM's ROCm code generator so that the one
   scheduled, lowered kernel module is code-generated once per requested arch (only ``mcpu``
   differs: the host code, kernel names and launch shapes are the same for all of them), each
   linked with that arch's bitcode (ISA version, wavefront size) by our ``ld.lld``;
3. embeds, for one arch, its code object as TVM does; for several, one clang offload bundle
   (``__CLANG_OFFLOAD_BUNDLE__``, an entry ``hipv4-amdgcn-amd-amdhsa--gfxNNN`` per arch), the
   "fat binary" ``hipModuleLoadData`` accepts, from which HIP loads the code object of the GPU's arch.

The device then needs a TVM runtime built with ROCm (the PyPI Linux wheel has none) and no
compiler. The schedule is made once for all archs, so it must be valid on each: targets/rocm.py
uses 64-lane warps only when every arch runs wave64 (gfx9), else 32-lane warps (valid on both).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LLMOptError

MIN_LLD = 22  # LLVM 22 (TVM 0.27's) writes code object v6, which older lld rejects ("unknown abi version")
BITCODE_HOMES = ("/usr/lib/x86_64-linux-gnu", "/opt/rocm")  # Debian's rocm-device-libs; a ROCm install
DEVICE_LIBS_HINT = ("Install the ROCm device libraries: `apt-get install rocm-device-libs` (Debian/Ubuntu), "
                    "or a ROCm install (set ROCM_PATH to it); or build for another target, e.g. --target cpu.")
LLD_HINT = ("Install an ld.lld of LLVM 22 or newer: `pip install ziglang` (ships LLD 22, used through "
            "`python -m ziglang ld.lld`), or put one on PATH; or build for another target, e.g. --target cpu.")
# The bitcode TVM links (tvm.support.rocm.callback_rocm_bitcode_path, in its order, both variants of some
# oclc controls included as there), minus its fixed ISA versions and wave64 setting: each arch gets its own.
BITCODE = ("oclc_daz_opt_on", "ocml", "oclc_correctly_rounded_sqrt_off", "oclc_correctly_rounded_sqrt_on",
           "oclc_daz_opt_off", "oclc_finite_only_off", "oclc_finite_only_on", "oclc_unsafe_math_off",
           "oclc_unsafe_math_on", "oclc_abi_version_500")
WAVEFRONT = {64: "oclc_wavefrontsize64_on", 32: "oclc_wavefrontsize64_off"}
BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
BUNDLE_ALIGN = 4096  # clang-offload-bundler aligns HIP code objects to a page
HOST_ENTRY = "host-x86_64-unknown-linux-gnu-"  # the empty host entry clang-offload-bundler puts first


def wavefront_size(arch: str) -> int:
    """The wavefront LLVM compiles ``arch`` for by default: 64 on GCN/CDNA (gfx9 and older), 32 on RDNA."""
    return 64 if int(arch.removeprefix("gfx")[:-2] or 0) < 10 else 32


def bundle_entry_id(arch: str) -> str:
    """The offload bundle's ID for a code object of ``arch`` (code object v4 and later: ``hipv4``)."""
    return f"hipv4-amdgcn-amd-amdhsa--{arch}"


@dataclass(frozen=True)
class Toolchain:
    bitcode_dir: Path
    lld: tuple[str, ...]  # the command that runs ld.lld


def bitcode_dirs() -> list[Path]:
    """Where device-library bitcode may be: under $ROCM_PATH, Debian's folder, /opt/rocm (and the
    folder ROCm 6 moved it to)."""
    homes = [os.environ.get("ROCM_PATH"), *BITCODE_HOMES]
    found = [Path(home) / "amdgcn" / "bitcode" for home in homes if home]
    return found + sorted(Path("/opt/rocm/lib/llvm/lib/clang").glob("*/lib/amdgcn/bitcode"))


def missing_bitcode(folder: Path) -> list[str]:
    return [f"{name}.bc" for name in (*BITCODE, *WAVEFRONT.values()) if not (folder / f"{name}.bc").is_file()]


def find_bitcode_dir() -> Path | None:
    """The first bitcode folder holding every file a build links; None when there is none."""
    return next((folder for folder in bitcode_dirs() if folder.is_dir() and not missing_bitcode(folder)), None)


@functools.lru_cache(maxsize=None)
def lld_major(command: tuple[str, ...]) -> int | None:
    """The LLVM major version of ``command --version`` ("LLD 22.1.8 ..."); None if it does not run."""
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"LLD (\d+)\.", out.stdout + out.stderr)
    return int(match.group(1)) if out.returncode == 0 and match else None


def ziglang_lld() -> tuple[str, ...] | None:
    """The command running PyPI ziglang's ld.lld; None when ziglang is not installed."""
    return (sys.executable, "-m", "ziglang", "ld.lld") if importlib.util.find_spec("ziglang") is not None else None


def lld_candidates() -> list[tuple[str, ...]]:
    """ld.lld on PATH (versioned names of LLVM >= MIN_LLD first), then PyPI ziglang's."""
    names = [f"ld.lld-{v}" for v in range(MIN_LLD + 8, MIN_LLD - 1, -1)] + ["ld.lld"]
    found = [(path,) for path in dict.fromkeys(filter(None, map(shutil.which, names)))]
    return found + [command for command in [ziglang_lld()] if command]


def find_lld() -> tuple[tuple[str, ...] | None, list[str]]:
    """(the first ld.lld of LLVM >= MIN_LLD, or None; the too old ones found, described)."""
    too_old = []
    for command in lld_candidates():
        major = lld_major(command)
        if major is not None and major >= MIN_LLD:
            return command, too_old
        too_old.append(f"{' '.join(command)} (LLD {major if major is not None else 'that does not run'})")
    return None, too_old


def check_toolchain(archs: tuple[str, ...]) -> Toolchain:
    """The bitcode folder and ld.lld to use; an LLMOptError naming what to install when one is
    missing, or when there is no host C compiler (the library's host part is linked with it)."""
    from .cuda_toolchain import find_c_compiler
    folder = find_bitcode_dir()
    if folder is None:
        partial = [f"{d} (lacks {', '.join(missing_bitcode(d)[:3])})" for d in bitcode_dirs() if d.is_dir()]
        raise LLMOptError("target rocm: the ROCm device libraries (ocml and oclc_*.bc bitcode) were not found"
                          + (f": {'; '.join(partial)}" if partial else f" in {', '.join(map(str, bitcode_dirs()))}")
                          + "; the kernels are compiled at build time.", DEVICE_LIBS_HINT)
    lld, too_old = find_lld()
    if lld is None:
        raise LLMOptError(f"target rocm: no ld.lld of LLVM {MIN_LLD} or newer was found"
                          + (f" (found {', '.join(too_old)})" if too_old else " on PATH or in pip's ziglang")
                          + "; it links the AMDGPU code objects (code object v6).", LLD_HINT)
    if find_c_compiler() is None:
        raise LLMOptError("target rocm: no host C compiler (gcc or cc) was found; it links the library's "
                          "x86-64 host code.", "Install gcc (e.g. `apt-get install gcc g++`) and put it on PATH.")
    return Toolchain(folder, lld)


def bitcode_files(folder: Path, arch: str) -> list[str]:
    """The bitcode linked into ``arch``'s kernels: TVM's list with ``arch``'s wavefront size and ISA
    version (when the device libraries have one for it; else none, and ``ld.lld --no-undefined``
    fails if a kernel needed it)."""
    isa = folder / f"oclc_isa_version_{arch.removeprefix('gfx')}.bc"
    names = [*BITCODE, WAVEFRONT[wavefront_size(arch)]]
    return [str(folder / f"{name}.bc") for name in names] + ([str(isa)] if isa.is_file() else [])


def link_code_object(lld: tuple[str, ...], obj: bytes) -> bytes:
    """``ld.lld -shared`` of one AMDGPU object file: the code object (hsaco)."""
    with tempfile.TemporaryDirectory(prefix="llmopt-rocm-") as tmp:
        source, target = Path(tmp) / "kernels.o", Path(tmp) / "kernels.hsaco"
        source.write_bytes(obj)
        result = subprocess.run([*lld, "--no-undefined", "-shared", str(source), "-o", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:  # generated code that does not link: an llmopt (or TVM) bug
            raise RuntimeError(f"ld.lld failed on the generated AMDGPU kernels:\n{result.stdout}{result.stderr}")
        return target.read_bytes()


def offload_bundle(code_objects: dict[str, bytes]) -> bytes:
    """A clang offload bundle of one code object per arch (clang's binary layout: magic, count, then
    (offset, size, ID length, ID) per entry, then the page-aligned code objects), an empty host entry first."""
    entries = [(HOST_ENTRY, b"")] + [(bundle_entry_id(arch), data) for arch, data in code_objects.items()]
    header = len(BUNDLE_MAGIC) + 8 + sum(24 + len(entry_id) for entry_id, _ in entries)
    offsets, end = [], header
    for _, data in entries:
        start = end if not data else -(-end // BUNDLE_ALIGN) * BUNDLE_ALIGN
        offsets.append(start)
        end = start + len(data)
    out = bytearray(BUNDLE_MAGIC + struct.pack("<Q", len(entries)))
    for (entry_id, data), offset in zip(entries, offsets):
        out += struct.pack("<QQQ", offset, len(data), len(entry_id)) + entry_id.encode()
    for (_, data), offset in zip(entries, offsets):
        out += b"\0" * (offset - len(out)) + data
    return bytes(out)


class _PerArchCodegen:
    """TVM's ``target.build.rocm`` made to generate the kernels once per arch, and the link and
    bitcode callbacks it calls, for ``archs`` (the first is the target's ``mcpu``)."""

    def __init__(self, toolchain: Toolchain, archs: tuple[str, ...], original):
        self.toolchain, self.archs, self.original = toolchain, archs, original
        self.arch: str | None = None  # the arch being generated
        self.code_objects: dict[str, bytes] = {}
        self.calls = 0

    def bitcode_path(self, *_):
        import tvm
        return tvm.runtime.convert(bitcode_files(self.toolchain.bitcode_dir, self.arch or self.archs[0]))

    def link(self, obj):
        code_object = link_code_object(self.toolchain.lld, bytes(obj))
        self.code_objects[self.arch] = code_object
        if self.arch != self.archs[0] or len(self.archs) == 1:
            return bytearray(code_object)
        return bytearray(offload_bundle({arch: self.code_objects[arch] for arch in self.archs}))

    def build(self, mod, target):
        import tvm
        mcpu = str(target.attrs.get("mcpu", ""))
        if mcpu != self.archs[0]:
            raise RuntimeError(f"ROCm codegen called for {mcpu!r}, expected {self.archs[0]!r}")
        self.calls += 1
        self.code_objects = {}
        for arch in self.archs[1:]:  # the other archs first: the first one's call returns the bundle
            self.arch = arch
            self.original(mod, tvm.target.Target({**target.export(), "mcpu": arch}))
        self.arch = self.archs[0]
        try:
            return self.original(mod, target)
        finally:
            self.arch = None


@contextlib.contextmanager
def compile_context(archs: tuple[str, ...]):
    """Around ``tvm.compile`` for a ROCm target: the kernels become one code object per arch of
    ``archs``, bundled when there are several. Raises RuntimeError afterwards if TVM generated no
    ROCm code or an arch got no code object."""
    import tvm.support.rocm  # noqa: F401  (registers TVM's own callbacks first, so that ours override them)
    import tvm_ffi

    codegen = _PerArchCodegen(check_toolchain(archs), archs, tvm_ffi.get_global_func("target.build.rocm"))
    hooks = {"target.build.rocm": codegen.build, "tvm_callback_rocm_link": codegen.link,
             "tvm_callback_rocm_bitcode_path": codegen.bitcode_path}
    previous = {name: tvm_ffi.get_global_func(name, allow_missing=True) for name in hooks}
    for name, hook in hooks.items():
        tvm_ffi.register_global_func(name, hook, override=True)
    try:
        yield codegen
    finally:
        for name, function in previous.items():
            if function is not None:
                tvm_ffi.register_global_func(name, function, override=True)
    if not codegen.calls or set(codegen.code_objects) != set(archs):
        raise RuntimeError(f"TVM's ROCm code generator made code objects for {sorted(codegen.code_objects)}, "
                           f"not for {list(archs)}")
