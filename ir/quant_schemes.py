"""Quantization schemes as data, with their numpy reference semantics.

A ``Scheme`` says how a float weight ``w[N, K]`` (N output features, K input features) becomes
integer codes: ``bits`` per code, one scale (and, when asymmetric, one zero point) per group of
``group_size`` consecutive input features of a row (``group_size=0``: one group per row, i.e. per
output channel). A row has ``ceil(K / group_size)`` groups: when ``group_size`` does not divide
``K`` the last group is short ("ragged", as in GPTQ/ExLlama formats), holding the last
``K % group_size`` features, and its scale and zero come from those values only.

- Symmetric int-b: ``scale = max|w| / (2^(b-1) - 1)`` per group, ``q = clip(round(w / scale),
  -(2^(b-1) - 1), 2^(b-1) - 1)``, stored unsigned as ``code = q + 2^(b-1)``;
  ``w ~ (code - 2^(b-1)) * scale``.
- Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)`` (an integer held
  in f32), ``code = clip(round(w / scale) + zero, 0, 2^b - 1)``; ``w ~ (code - zero) * scale``.

A group whose scale would be 0 (all zeros; or, asymmetric, all equal to ``c``) gets scale 1
(asymmetric: ``|c|`` when ``c != 0``), so it still dequantizes exactly.
Codebook schemes (NF4, FP8 E4M3) store the index of a level instead: ``w ~ codebook[code] * scale``
with ``scale = max|w| / max|codebook|`` per group, each value rounded to the nearest level.
Rounding is numpy's round-half-to-even. Except for the clip at the edge of the code range, which
only ever moves a value by at most half a step, each value is within ``scale / 2`` of its weight.

Packing: each row's codes are packed little-end first into uint32 words, ``32 // bits`` codes per
word (code ``k`` sits at bit ``(k % per_word) * bits`` of word ``k // per_word``); the last word of a
row is zero-padded. So 8- and 4-bit codes fill words exactly (``ceil(K * bits / 32)`` words), and
3-bit codes go 10 to a word with the top 2 bits unused (``ceil(K / 10)`` words): a code never
straddles two words, which keeps unpacking one shift and one mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import LLMOptError


@dataclass(frozen=True)
class QuantizedWeight:
    codes: np.ndarray  # uint8 [N, K], unsigned codes in [0, 2^bits)
    scales: np.ndarray  # f32 [N, groups]
    zeros: np.ndarray | None  # f32 [N, groups] for asymmetric schemes, else None


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    group_size: int  # input features per scale; 0 = one scale per output channel
    symmetric: bool
    storage_dtype: str = "u32"
    scale_dtype: str = "f32"
    codebook: tuple[float, ...] | None = None  # level of each code (NF4, FP8); None: integer levels

    def __post_init__(self):
        problems = []
        if not self.name:
            problems.append("it has no name")
        if not 2 <= self.bits <= 8:
            problems.append(f"bits={self.bits} is not in 2..8")
        if self.group_size < 0:
            problems.append(f"group_size={self.group_size} is negative")
        if self.storage_dtype != "u32":
            problems.append(f"storage_dtype={self.storage_dtype!r} is not 'u32'")
        if self.codebook is not None and (len(self.codebook) != 2 ** self.bits or not self.symmetric):
            problems.append(f"a codebook needs 2**bits = {2 ** self.bits} levels and symmetric=True")
        if self.scale_dtype != "f32":
            problems.append(f"scale_dtype={self.scale_dtype!r} is not 'f32'")
        if problems:
            raise LLMOptError(f"quantization scheme {self.name!r} is invalid: {'; '.join(problems)}.",
                              "Use bits 2..8, group_size >= 0 (0 = per channel), u32 storage and f32 scales.")

    # ---- shapes --------------------------------------------------------------------------------

    @property
    def codes_per_word(self) -> int:
        return 32 // self.bits

    def packed_width(self, in_features: int) -> int:
        """uint32 words per row of ``in_features`` codes."""
        return -(-in_features // self.codes_per_word)

    def group_of(self, in_features: int) -> int:
        """Input features per scale for rows of ``in_features``."""
        return self.group_size or in_features

    def supports(self, in_features: int) -> bool:
        """Whether rows of ``in_features`` can be quantized: any positive width (the last group may be
        short, the last word is zero-padded)."""
        return in_features > 0

    def groups(self, in_features: int) -> int:
        """Scales per row: ``ceil(in_features / group)``, the last group short when ``group`` does not
        divide ``in_features``."""
        if not self.supports(in_features):
            raise LLMOptError(f"scheme {self.name}: rows of {in_features} input features cannot be quantized.",
                              "Quantize weights with at least one input feature.")
        return -(-in_features // self.group_of(in_features))

    # ---- numpy reference -----------------------------------------------------------------------
    # Three primitives, on groups (the last axis holds one group's values; ``scale`` and ``zero``
    # have the shape of the other axes): ``grid`` picks a group's scale (and zero), ``encode``
    # rounds values onto that grid, ``decode`` maps codes back. Methods that choose their own grid
    # or round column by column (GPTQ, AWQ's clipping search) compose them.

    def grid(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Round-to-nearest scale (and zero point, asymmetric only) of each group."""
        groups = groups.astype(np.float32)
        if self.codebook is not None:
            scale = np.abs(groups).max(axis=-1) / np.float32(max(abs(v) for v in self.codebook))
            return np.where(scale > 0, scale, np.float32(1)).astype(np.float32), None
        if self.symmetric:
            scale = np.abs(groups).max(axis=-1) / np.float32(self.qmax)
            return np.where(scale > 0, scale, np.float32(1)).astype(np.float32), None
        low, high = groups.min(axis=-1), groups.max(axis=-1)
        scale = (high - low) / np.float32(2 ** self.bits - 1)
        flat = np.where(low != 0, np.abs(low), np.float32(1))
        scale = np.where(scale > 0, scale, flat).astype(np.float32)
        return scale, np.round(-low / scale).astype(np.float32)

    def encode(self, values: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        """uint8 codes of ``values`` on the grid ``scale``/``zero`` (broadcast over the last axis)."""
        scaled = values.astype(np.float32) / scale[..., None]
        if self.codebook is not None:
            return self._nearest_code(scaled)
        if self.symmetric:
            return (np.clip(np.round(scaled), -self.qmax, self.qmax) + self.offset).astype(np.uint8)
        return np.clip(np.round(scaled) + zero[..., None], 0, 2 ** self.bits - 1).astype(np.uint8)

    def decode(self, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        """f32 values of ``codes`` on the grid ``scale``/``zero``."""
        if self.codebook is not None:
            levels = np.asarray(self.codebook, np.float32)[codes]
        else:
            levels = codes.astype(np.float32) - (zero[..., None] if zero is not None else np.float32(self.offset))
        return (levels * scale[..., None]).astype(np.float32)

    @property
    def qmax(self) -> int:
        """Largest symmetric integer level."""
        return 2 ** (self.bits - 1) - 1

    @property
    def offset(self) -> int:
        """What a symmetric integer code adds to its level."""
        return 2 ** (self.bits - 1)

    @property
    def has_zeros(self) -> bool:
        return not self.symmetric and self.codebook is None

    def _nearest_code(self, scaled: np.ndarray) -> np.ndarray:
        """Index of the nearest codebook level (ties: the lower level); NaN levels are never chosen."""
        levels = np.asarray(self.codebook, np.float64)
        usable = np.flatnonzero(~np.isnan(levels))
        order = usable[np.argsort(levels[usable], kind="stable")]
        sorted_levels = levels[order]
        midpoints = (sorted_levels[1:] + sorted_levels[:-1]) / 2
        return order[np.searchsorted(midpoints, scaled, side="left")].astype(np.uint8)

    def _groups(self, w: np.ndarray) -> np.ndarray:
        """``w[N, K]`` as ``[N, groups, group]``. A short last group is padded with copies of its last
        value ("edge"), which leaves its ``max |w|``, min and max, so its ``grid``, as they are; the
        padding is cropped again (``_ungroup``)."""
        n, k = w.shape
        groups, group = self.groups(k), self.group_of(k)
        return np.pad(w, ((0, 0), (0, groups * group - k)), mode="edge").reshape(n, groups, group)

    @staticmethod
    def _ungroup(groups: np.ndarray, in_features: int) -> np.ndarray:
        """``[N, groups, group]`` back to ``[N, in_features]``, the last group's padding dropped."""
        return np.ascontiguousarray(groups.reshape(len(groups), -1)[:, :in_features])

    def quantize(self, w: np.ndarray) -> QuantizedWeight:
        """Round-to-nearest quantization of ``w[N, K]``."""
        groups = self._groups(w.astype(np.float32))
        scale, zero = self.grid(groups)
        return QuantizedWeight(self._ungroup(self.encode(groups, scale, zero), w.shape[1]), scale, zero)

    def dequantize(self, quantized: QuantizedWeight) -> np.ndarray:
        """f32 ``[N, K]`` from codes, scales and zeros."""
        codes = quantized.codes
        return self._ungroup(self.decode(self._groups(codes), quantized.scales, quantized.zeros), codes.shape[1])

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """uint32 ``[N, packed_width(K)]`` holding ``codes[N, K]`` (see the module docstring)."""
        n, k = codes.shape
        per_word = self.codes_per_word
        padded = np.zeros((n, self.packed_width(k) * per_word), np.uint32)
        padded[:, :k] = codes
        shifts = (np.arange(per_word, dtype=np.uint32) * self.bits)
        words = padded.reshape(n, -1, per_word) << shifts
        return np.bitwise_or.reduce(words, axis=-1).astype(np.uint32)

    def unpack(self, packed: np.ndarray, in_features: int) -> np.ndarray:
        """uint8 codes ``[N, in_features]`` from ``pack``'s words."""
        shifts = np.arange(self.codes_per_word, dtype=np.uint32) * self.bits
        codes = (packed[..., None] >> shifts) & np.uint32(2 ** self.bits - 1)
        return codes.reshape(packed.shape[0], -1)[:, :in_features].astype(np.uint8)

    def dequantize_packed(self, packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                          in_features: int) -> np.ndarray:
        """What the ``dequantize`` IR op computes."""
        return self.dequantize(QuantizedWeight(self.unpack(packed, in_features), scales, zeros))


NF4_LEVELS = (  # QLoRA's NormalFloat4: quantiles of N(0, 1), scaled to [-1, 1], with an exact zero
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)


def fp8_e4m3_levels() -> tuple[float, ...]:
    """The value of each FP8 E4M3 (``e4m3fn``) byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits,
    no infinities; the two NaN bytes (S.1111.111) are levels ``encode`` never picks."""
    levels = []
    for byte in range(256):
        sign = -1.0 if byte >> 7 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
        if exponent == 0xF and mantissa == 0x7:
            levels.append(float("nan"))
        elif exponent == 0:
            levels.append(sign * mantissa / 8 * 2.0 ** -6)
        else:
            levels.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return tuple(levels)


def _integer_scheme(name: str) -> Scheme | None:
    """``w<bits>[g<group>][-asym]`` (e.g. ``w4``, ``w3g64-asym``), or None when ``name`` is not one."""
    match = re.fullmatch(r"w([2-8])(?:g(\d+))?(-asym)?", name)
    if match is None or (match[2] is not None and int(match[2]) <= 0):
        return None
    return Scheme(name, bits=int(match[1]), group_size=int(match[2] or 0), symmetric=match[3] is None)


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (
    *(_integer_scheme(name) for name in ("w8", "w8g128", "w4", "w4g128", "w4g64", "w4g32", "w4g128-asym",
                                         "w4g32-asym", "w3g128", "w3g128-asym", "w3g64")),
    Scheme("nf4g64", bits=4, group_size=64, symmetric=True, codebook=NF4_LEVELS),
    Scheme("nf4g128", bits=4, group_size=128, symmetric=True, codebook=NF4_LEVELS),
    Scheme("fp8", bits=8, group_size=0, symmetric=True, codebook=fp8_e4m3_levels()),
)}


def get_scheme(name: str) -> Scheme:
    """The scheme ``name``: a registered one, or any ``w<bits>[g<group>][-asym]``; an LLMOptError
    naming the known ones otherwise."""
    scheme = SCHEMES.get(name) or _integer_scheme(name)
    if scheme is None:
        raise LLMOptError(f"unknown quantization scheme {name!r}.",
                          f"Known schemes: {', '.join(SCHEMES)}, or any w<bits 2-8>[g<group>][-asym].")
    return scheme
