"""Read the device code inside a library file, without vendor tools: AMDGPU code objects (alone or
in clang offload bundles), the Mach-O header of a macOS dylib, and the WGSL kernels of a WebGPU
module serialized into a wasm library.

An AMDGPU code object is an ELF64 file for machine EM_AMDGPU (224), OS ABI AMDGPU_HSA (64), whose
e_flags hold the processor (EF_AMDGPU_MACH, bits 0-7) and whose metadata note names the target
(``amdhsa.target``, e.g. ``amdgcn-amd-amdhsa-hcc-gfx90a``) and each kernel's ``.wavefront_size``.
A clang offload bundle is ``__CLANG_OFFLOAD_BUNDLE__``, a u64 entry count, then per entry u64
offset, u64 size, u64 ID length and the ID (``hipv4-amdgcn-amd-amdhsa--gfx90a``), offsets counted
from the magic. A Mach-O file starts with magic 0xfeedfacf (64-bit), cputype, cpusubtype, filetype,
ncmds, sizeofcmds, flags, reserved, then its load commands (u32 cmd, u32 size, ...).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

EM_AMDGPU = 224
ELFOSABI_AMDGPU_HSA = 64
# EF_AMDGPU_MACH values (LLVM's ELF.h)
AMDGPU_MACH = {0x30: "gfx908", 0x3F: "gfx90a", 0x4C: "gfx942", 0x36: "gfx1030", 0x41: "gfx1100"}
BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
MH_MAGIC_64 = 0xFEEDFACF
CPU_TYPE_ARM64 = 0x0100000C
MH_DYLIB = 6
LC_CODE_SIGNATURE = 0x1D
LC_BUILD_VERSION = 0x32
LC_ID_DYLIB = 0x0D
PLATFORM_MACOS = 1


@dataclass(frozen=True)
class CodeObject:
    arch: str | None  # from e_flags
    note_target: str | None  # amdhsa.target from the metadata note
    abi_version: int  # e_ident[EI_ABIVERSION]: 4 = code object v6
    os_abi: int
    wavefront_sizes: frozenset[int]
    bundle_id: str | None  # the offload bundle entry it came from (None: stored alone)


def _code_object(data: bytes, bundle_id: str | None) -> CodeObject:
    flags, = struct.unpack_from("<I", data, 48)
    note = re.search(rb"amdhsa\.target[\xa0-\xbf\xd9](amdgcn-[a-z0-9-]+)", data)
    waves = frozenset(size[0] for size in re.findall(rb"\.wavefront_size(.)", data, re.S))  # msgpack fixint
    return CodeObject(AMDGPU_MACH.get(flags & 0xFF), note.group(1).decode() if note else None, data[8], data[7],
                      waves, bundle_id)


def is_amdgpu_elf(data: bytes, at: int = 0) -> bool:
    return (data[at:at + 4] == b"\x7fELF" and data[at + 4] == 2
            and struct.unpack_from("<H", data, at + 18)[0] == EM_AMDGPU)


def offload_bundles(data: bytes) -> list[list[tuple[str, bytes]]]:
    """The (entry ID, payload) of each clang offload bundle found in ``data``."""
    bundles, start = [], data.find(BUNDLE_MAGIC)
    while start >= 0:
        count, = struct.unpack_from("<Q", data, start + 24)
        p, entries = start + 32, []
        for _ in range(count):
            offset, size, id_len = struct.unpack_from("<QQQ", data, p)
            entry_id = data[p + 24:p + 24 + id_len].decode()
            entries.append((entry_id, data[start + offset:start + offset + size]))
            p += 24 + id_len
        bundles.append(entries)
        start = data.find(BUNDLE_MAGIC, start + 1)
    return bundles


def amdgpu_code_objects(data: bytes) -> list[CodeObject]:
    """Every AMDGPU code object in ``data``: those in offload bundles (with their entry IDs), then
    those stored alone (ELF files for EM_AMDGPU found outside any bundle)."""
    found, inside = [], set()
    for bundle in offload_bundles(data):
        for entry_id, payload in bundle:
            if payload:
                assert is_amdgpu_elf(payload), f"bundle entry {entry_id} is not an AMDGPU ELF file"
                found.append(_code_object(payload, entry_id))
                inside.add(data.find(payload))
    at = data.find(b"\x7fELF", 1)
    while at >= 0:
        if at not in inside and is_amdgpu_elf(data, at):
            found.append(_code_object(data[at:], None))
        at = data.find(b"\x7fELF", at + 1)
    return found


@dataclass(frozen=True)
class MachO:
    magic: int
    cputype: int
    filetype: int
    commands: dict[int, bytes]  # load command -> its bytes (the last of each kind)


def macho(data: bytes) -> MachO:
    magic, cputype, _, filetype, ncmds, _, _, _ = struct.unpack_from("<IIIIIIII", data, 0)
    commands, p = {}, 32
    for _ in range(ncmds if magic == MH_MAGIC_64 else 0):
        cmd, size = struct.unpack_from("<II", data, p)
        commands[cmd] = data[p:p + size]
        p += size
    return MachO(magic, cputype, filetype, commands)


def macos_min_version(command: bytes) -> tuple[int, int]:
    """(major, minor) of an LC_BUILD_VERSION's minos."""
    minos, = struct.unpack_from("<I", command, 12)
    return minos >> 16, (minos >> 8) & 0xFF


def wgsl_kernels(data: bytes) -> dict[str, str]:
    """The WGSL of each kernel, from the WebGPU module TVM serialized into the library's data (kind
    "webgpu", then its bytes: a map of function infos (name, arg dtypes, launch tags, extra tags),
    then name -> source). The kind's string may occur elsewhere too: the one that parses is it."""
    needle = struct.pack("<Q", 6) + b"webgpu"
    start = data.find(needle)
    while start >= 0:
        try:
            return _webgpu_module(data, start + len(needle))
        except (AssertionError, UnicodeDecodeError, struct.error, IndexError):
            start = data.find(needle, start + 1)
    raise AssertionError("no serialized WebGPU module in the library")


def _webgpu_module(data: bytes, at: int) -> dict[str, str]:
    end = at + 8 + struct.unpack_from("<Q", data, at)[0]
    at += 8

    def u64():
        nonlocal at
        at += 8
        return struct.unpack_from("<Q", data, at - 8)[0]

    def text():
        nonlocal at
        length = u64()
        assert at + length <= end
        at += length
        return data[at - length:at].decode()

    def skip(item_bytes):  # an array of fixed-size items
        nonlocal at
        count = u64()
        at += item_bytes * count

    for _ in range(u64()):  # function infos
        text(), text()
        skip(4)  # arg dtypes (DLDataType: code, bits, lanes)
        [text() for _ in range(u64())]  # launch parameter tags
        skip(4)  # extra arg tags (int32)
    kernels = {text(): text() for _ in range(u64())}
    assert at == end and kernels
    return kernels


def has_cuda_device() -> bool:
    """Whether this machine has a CUDA device TVM's runtime can use (tests that need one skip without)."""
    import tvm
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False
