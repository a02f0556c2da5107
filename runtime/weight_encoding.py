"""Sparse weights stored compactly in an artifact: the ``fill-bitmask`` encoding of a weight tensor.

A pruned weight is mostly one value: 0.0 for float weights, and for quantized codes the code of
level 0 (8 for a symmetric 4-bit scheme, 7 for NF4, 128 for ``w8``). The artifact can store such a
tensor as the units that differ from that *fill* value plus one bit per unit saying where they go:

- the tensor's raw bytes are read as ``units`` of ``unit_bits`` bits (4: the nibbles of each byte,
  low nibble first; 8, 16, 32: little-endian integers), which for packed codes are the codes
  themselves, in whatever layout the kernels read them;
- ``mask`` (u8): bit ``i`` (``np.packbits`` little bit order) is set when unit ``i`` is not
  ``fill``;
- ``values`` (u8): the set units in order, packed at ``unit_bits`` (two 4-bit units to a byte, low
  nibble first; the last byte zero-padded).

Decoding rebuilds the tensor bit for bit, so a model loaded from an encoded artifact computes
exactly what the plain one does; only the bytes on disk (and read at load time) shrink. Bytes per
unit: ``1/8 + kept * unit_bits/8`` against ``unit_bits/8``: 50 % unstructured f32 sparsity stores
53 % of the plain bytes, int4 codes of a 2:4-sparse weight about 70 %.

This module imports only numpy: the artifact writer encodes, the runtime loader decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KIND = "fill-bitmask"
UNIT_BITS = (4, 8, 16, 32)
MIN_SAVING = 0.10
"""Encode a tensor only when the encoding is at least this fraction smaller than the plain bytes."""
MIN_BYTES = 4096
"""Tensors smaller than this are stored plain (norm weights, biases, scales: nothing to win)."""
MASK_SUFFIX = "@mask"
VALUES_SUFFIX = "@values"


@dataclass(frozen=True)
class WeightEncoding:
    """How one weight is stored: the tensors ``mask`` and ``values`` (in the weight's shard) hold its
    ``units`` units of ``unit_bits`` bits, the ``kept`` ones that differ from ``fill``."""

    kind: str
    unit_bits: int
    fill: int
    units: int
    kept: int
    mask: str
    values: str

    def __post_init__(self) -> None:
        if self.kind != KIND:
            raise TypeError(f"unknown weight encoding {self.kind!r} (this llmopt reads {KIND!r})")
        if self.unit_bits not in UNIT_BITS:
            raise TypeError(f"weight encoding unit_bits {self.unit_bits} is not one of {UNIT_BITS}")


def _units(raw: np.ndarray, unit_bits: int) -> np.ndarray:
    """The units of the bytes ``raw`` (u8, C order) as unsigned integers."""
    if unit_bits == 4:
        nibbles = np.empty(raw.size * 2, dtype=np.uint8)
        nibbles[0::2] = raw & 0x0F
        nibbles[1::2] = raw >> 4
        return nibbles
    return raw.view(f"<u{unit_bits // 8}")


def _pack_units(units: np.ndarray, unit_bits: int) -> np.ndarray:
    """``units`` as bytes (the inverse of ``_units``; an odd count of nibbles gets a zero high nibble)."""
    if unit_bits == 4:
        padded = np.zeros(units.size + units.size % 2, dtype=np.uint8)
        padded[:units.size] = units
        return padded[0::2] | (padded[1::2] << 4)
    return np.ascontiguousarray(units, dtype=f"<u{unit_bits // 8}").view(np.uint8)


def _candidates(dtype: np.dtype) -> list[int]:
    """Unit widths worth trying for ``dtype``: a float's own width (its zero is all-zero bits);
    every width up to an integer's own (packed codes of 4 or 8 bits live inside wider words)."""
    bits = dtype.itemsize * 8
    if dtype.kind == "f":
        return [bits] if bits in UNIT_BITS else []
    return [b for b in UNIT_BITS if b <= bits and bits % b == 0]


def _fill(units: np.ndarray, unit_bits: int) -> int:
    """The most frequent unit (the fill value worth leaving out); 0 for wide units."""
    if unit_bits > 8:
        return 0
    return int(np.argmax(np.bincount(units, minlength=1 << unit_bits)))


def encoded_bytes(units: int, kept: int, unit_bits: int) -> int:
    """Bytes of the mask and the values."""
    return (units + 7) // 8 + (kept * unit_bits + 7) // 8


def encode(name: str, array: np.ndarray, min_saving: float = MIN_SAVING,
           min_bytes: int = MIN_BYTES) -> tuple[WeightEncoding, np.ndarray, np.ndarray] | None:
    """``(encoding, mask, values)`` of the smallest fill-bitmask encoding of ``array`` (stored as
    ``name``), or None when none saves ``min_saving`` of its bytes or it is under ``min_bytes``."""
    array = np.ascontiguousarray(array)
    if array.nbytes < min_bytes or array.dtype.byteorder == ">":
        return None
    raw = array.reshape(-1).view(np.uint8)
    best = None
    for unit_bits in _candidates(array.dtype):
        units = _units(raw, unit_bits)
        fill = _fill(units, unit_bits)
        where = units != fill
        size = encoded_bytes(units.size, int(np.count_nonzero(where)), unit_bits)
        if size <= array.nbytes * (1 - min_saving) and (best is None or size < best[0]):
            best = (size, unit_bits, fill, units, where)
    if best is None:
        return None
    _, unit_bits, fill, units, where = best
    kept = int(np.count_nonzero(where))
    encoding = WeightEncoding(KIND, unit_bits, fill, int(units.size), kept,
                              name + MASK_SUFFIX, name + VALUES_SUFFIX)
    return encoding, np.packbits(where, bitorder="little"), _pack_units(units[where], unit_bits)


def decode(encoding: WeightEncoding, mask: np.ndarray, values: np.ndarray, shape: tuple[int, ...],
           dtype: str) -> np.ndarray:
    """The tensor ``encode`` stored, bit for bit; ValueError when the parts do not fit it."""
    dtype = np.dtype(dtype)
    bits = encoding.unit_bits
    total_bits = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize * 8
    if total_bits != encoding.units * bits:
        raise ValueError(f"its encoding holds {encoding.units} units of {bits} bits, "
                         f"not the {total_bits} bits of {dtype.name}{list(shape)}")
    if mask.dtype != np.uint8 or mask.size != (encoding.units + 7) // 8:
        raise ValueError(f"its mask has {mask.size} bytes, not {(encoding.units + 7) // 8}")
    where = np.unpackbits(mask.reshape(-1), count=encoding.units, bitorder="little").view(bool)
    kept = int(np.count_nonzero(where))
    if kept != encoding.kept or values.dtype != np.uint8 or values.size != (kept * bits + 7) // 8:
        raise ValueError(f"its mask sets {kept} units and its values hold {values.size} bytes; "
                         f"the encoding says {encoding.kept} units")
    if bits == 4:
        stored = np.empty(values.size * 2, dtype=np.uint8)
        stored[0::2] = values & 0x0F
        stored[1::2] = values >> 4
        stored = stored[:kept]
    else:
        stored = values.reshape(-1).view(f"<u{bits // 8}")
    units = np.full(encoding.units, encoding.fill, dtype=np.uint8 if bits == 4 else f"<u{bits // 8}")
    units[where] = stored
    return _pack_units(units, bits).view(dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
