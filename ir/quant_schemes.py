"""Quantization schemes as data, with their numpy reference semantics.

A ``Scheme`` says how a float weight ``w[N, K]`` (N output features, K input features) becomes
integer codes: ``bits`` per code, one scale (and, when asymmetric, one zero point) per group of
``group_size`` consecutive input features of a row (``group_size=0``: one group per row, i.e. per
output channel).

- Symmetric int-b: ``scale = max|w| / (2^(b-1) - 1)`` per group, ``q = clip(round(w / scale),
  -(2^(b-1) - 1), 2^(b-1) - 1)``, stored unsigned as ``code = q + 2^(b-1)``;
  ``w ~ (code - 2^(b-1)) * scale``.
- Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)`` (an integer held
  in f32), ``code = clip(round(w / scale) + zero, 0, 2^b - 1)``; ``w ~ (code - zero) * scale``.

A group whose scale would be 0 (all zeros; or, asymmetric, all equal to ``c``) gets scale 1
(asymmetric: ``|c|`` when ``c != 0``), so it still dequantizes exactly.
Rounding is numpy's round-half-to-even. Except for the clip at the edge of the code range, which
only ever moves a value by at most half a step, each value is within ``scale / 2`` of its weight.

Packing: each row's codes are packed little-end first into uint32 words, ``32 // bits`` codes per
word (code ``k`` sits at bit ``(k % per_word) * bits`` of word ``k // per_word``); the last word of a
row is zero-padded. So 8- and 4-bit codes fill words exactly (``ceil(K * bits / 32)`` words), and
3-bit codes go 10 to a word with the top 2 bits unused (``ceil(K / 10)`` words): a code never
straddles two words, which keeps unpacking one shift and one mask.
"""

from __future__ import annotations

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
        return in_features > 0 and in_features % self.group_of(in_features) == 0

    def groups(self, in_features: int) -> int:
        """Scales per row."""
        if not self.supports(in_features):
            raise LLMOptError(f"scheme {self.name}: {in_features} input features are not a multiple of its "
                              f"group size {self.group_size}.", "Pick a scheme whose group size divides them.")
        return in_features // self.group_of(in_features)

    # ---- numpy reference -----------------------------------------------------------------------

    def quantize(self, w: np.ndarray) -> QuantizedWeight:
        """Round-to-nearest quantization of ``w[N, K]``."""
        n, k = w.shape
        groups = w.astype(np.float32).reshape(n, self.groups(k), self.group_of(k))
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            scale = np.abs(groups).max(axis=-1) / np.float32(qmax)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            q = np.clip(np.round(groups / scale[..., None]), -qmax, qmax)
            codes = q + 2 ** (self.bits - 1)
            zeros = None
        else:
            low, high = groups.min(axis=-1), groups.max(axis=-1)
            scale = (high - low) / np.float32(2 ** self.bits - 1)
            flat = np.where(low != 0, np.abs(low), np.float32(1))
            scale = np.where(scale > 0, scale, flat).astype(np.float32)
            zeros = np.round(-low / scale).astype(np.float32)
            codes = np.clip(np.round(groups / scale[..., None]) + zeros[..., None], 0, 2 ** self.bits - 1)
        return QuantizedWeight(codes.reshape(n, k).astype(np.uint8), scale, zeros)

    def dequantize(self, quantized: QuantizedWeight) -> np.ndarray:
        """f32 ``[N, K]`` from codes, scales and zeros."""
        codes = quantized.codes
        n, k = codes.shape
        groups = codes.reshape(n, self.groups(k), self.group_of(k)).astype(np.float32)
        zero = quantized.zeros if not self.symmetric else np.full_like(quantized.scales, 2 ** (self.bits - 1))
        return ((groups - zero[..., None]) * quantized.scales[..., None]).reshape(n, k).astype(np.float32)

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


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (
    Scheme("w8", bits=8, group_size=0, symmetric=True),
    Scheme("w4g128", bits=4, group_size=128, symmetric=True),
    Scheme("w4g32-asym", bits=4, group_size=32, symmetric=False),
    Scheme("w4g64", bits=4, group_size=64, symmetric=True),
    Scheme("w3g128", bits=3, group_size=128, symmetric=True),
)}


def get_scheme(name: str) -> Scheme:
    """The registered scheme ``name``; an LLMOptError naming the known ones otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise LLMOptError(f"unknown quantization scheme {name!r}.",
                          f"Known schemes: {', '.join(SCHEMES)}.") from None
