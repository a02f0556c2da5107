"""Read the CUDA fatbins inside a file (e.g. a TVM library .so), without cuobjdump.

A fatbin is a header (magic 0xBA55ED50, u16 version, u16 header size, u64 size of the entries)
followed by entries: u16 kind (1 PTX, 2 ELF cubin), u16, u32 header size, u64 payload size, ...,
u32 arch (e.g. 80) at byte 28, u64 flags at byte 40 (0x2000: compressed payload); the payload
follows the entry's header. An uncompressed cubin is an ELF file for machine EM_CUDA (190) whose
e_flags hold the SM version (bits 8-15 for ELF ABI version 8 and later, else bits 0-7).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = struct.pack("<I", 0xBA55ED50)
KINDS = {1: "ptx", 2: "elf"}
EM_CUDA = 190
COMPRESSED = 0x2000


@dataclass(frozen=True)
class Entry:
    kind: str
    arch: str  # sm_XX
    compressed: bool
    elf_arch: str | None  # the SM the cubin's own ELF header names (uncompressed ELF entries only)


def fatbin_entries(data: bytes) -> list[list[Entry]]:
    """The entries of every fatbin found in ``data``."""
    fatbins, start = [], data.find(MAGIC)
    while start >= 0:
        _, version, header, size = struct.unpack_from("<IHHQ", data, start)
        entries, p, end = [], start + header, start + header + size
        while p < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
            arch, = struct.unpack_from("<I", data, p + 28)
            flags, = struct.unpack_from("<Q", data, p + 40)
            body = data[p + entry_header:p + entry_header + payload]
            entries.append(Entry(KINDS.get(kind, str(kind)), f"sm_{arch}", bool(flags & COMPRESSED),
                                 _elf_arch(body) if kind == 2 and not flags & COMPRESSED else None))
            p += entry_header + payload
        fatbins.append(entries)
        start = data.find(MAGIC, end)
    return fatbins


def _elf_arch(body: bytes) -> str | None:
    if body[:4] != b"\x7fELF" or struct.unpack_from("<H", body, 18)[0] != EM_CUDA:
        return None
    flags, = struct.unpack_from("<I", body, 48)
    return f"sm_{(flags >> 8) & 0xFF if body[8] >= 8 else flags & 0xFF}"
