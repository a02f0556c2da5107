"""N:M-sparse weights stored compactly: the format the ``densify`` op reads, with its numpy reference.

A weight ``w[N, K]`` is N:M sparse when every run of ``m`` consecutive inputs of a row (columns
``m*g .. m*g+m-1``, group ``g``) holds at most ``n`` nonzeros. It is stored as

- ``values`` f32 ``[N, K*n/m]``: slot ``s`` (``0 <= s < n``) of group ``g`` is column ``g*n + s``;
- ``indices`` u32 ``[N, ceil(K*n/m / per_word)]``: the position in its group (``0 <= p < m``) of
  each value, ``bits`` bits each (the smallest of 1, 2, 4, 8 with ``2**bits >= m``), packed
  little-end first, ``per_word = 32 // bits`` to a word (value ``c`` at bit ``(c % per_word) * bits``
  of word ``c // per_word``), the last word of a row zero-padded: as quantization packs its codes.

``densify`` rebuilds ``w[r, g*m + p] = sum of the values of group g at position p`` (a sum, so that
every reading, including a kernel gathering ``x`` at each position, agrees whatever the indices
are); ``compress`` writes a group's nonzeros in ascending position and fills the slots it does not
need with zeros at positions it leaves free, so positions within a group are distinct.

Bytes per weight: ``n/m * (4 + bits/8)`` (plus a row's last word's padding): 1:2 2.0625, 2:4 2.125
(53.1 % of dense f32's 4), 4:8 2.25.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LLMOptError

INDEX_BITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class NMFormat:
    """The storage of ``n`` of every ``m`` inputs."""

    n: int
    m: int

    def __post_init__(self):
        if not (0 < self.n < self.m <= 2 ** INDEX_BITS[-1]):
            raise LLMOptError(f"N:M storage {self.n}:{self.m} is invalid.",
                              f"Use 0 < N < M <= {2 ** INDEX_BITS[-1]}, e.g. 2:4.")

    @property
    def bits(self) -> int:
        """Bits per index: the smallest of 1, 2, 4, 8 that holds a position in a group of ``m``."""
        return next(b for b in INDEX_BITS if 2 ** b >= self.m)

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def fits(self, in_features: int) -> bool:
        return in_features > 0 and in_features % self.m == 0

    def kept(self, in_features: int) -> int:
        """Values per row: ``in_features * n / m``."""
        return in_features // self.m * self.n

    def index_words(self, in_features: int) -> int:
        """u32 words of indices per row."""
        return -(-self.kept(in_features) // self.per_word)

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of values and indices for a ``[out_features, in_features]`` weight."""
        return out_features * (4 * self.kept(in_features) + 4 * self.index_words(in_features))

    # ---- numpy reference -----------------------------------------------------------------------

    def holds(self, w: np.ndarray) -> bool:
        """Whether ``w[N, K]`` has at most ``n`` nonzeros in every group of ``m`` inputs."""
        rows, k = w.shape
        if not self.fits(k):
            return False
        return int(np.count_nonzero(w.reshape(rows, k // self.m, self.m), axis=-1).max(initial=0)) <= self.n

    def compress(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values f32 ``[N, K*n/m]``, packed indices u32) of an N:M-sparse ``w``; an error when it
        is not (see ``holds``). Each group lists its nonzeros by ascending position, then zeros at
        the lowest positions that hold none of them."""
        w = np.asarray(w, np.float32)
        if not self.holds(w):
            raise ValueError(f"weight {w.shape} is not {self.n}:{self.m} sparse")
        rows, k = w.shape
        groups = w.reshape(rows, k // self.m, self.m)
        # order positions: nonzeros first (ascending), then zeros (ascending); keep the first n
        order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :self.n]
        order = np.sort(order, axis=-1)  # distinct positions, ascending: zeros used as padding stay at free spots
        values = np.take_along_axis(groups, order, axis=-1).reshape(rows, -1)
        return np.ascontiguousarray(values), self.pack(order.reshape(rows, -1).astype(np.uint8))

    def pack(self, positions: np.ndarray) -> np.ndarray:
        """u32 ``[N, words]`` holding ``positions[N, C]`` (uint8, each < m)."""
        rows, count = positions.shape
        padded = np.zeros((rows, -(-count // self.per_word) * self.per_word), np.uint32)
        padded[:, :count] = positions
        shifts = np.arange(self.per_word, dtype=np.uint32) * self.bits
        return np.bitwise_or.reduce(padded.reshape(rows, -1, self.per_word) << shifts, axis=-1).astype(np.uint32)

    def unpack(self, indices: np.ndarray, count: int) -> np.ndarray:
        """uint8 positions ``[N, count]`` from ``pack``'s words."""
        shifts = np.arange(self.per_word, dtype=np.uint32) * self.bits
        positions = (indices[..., None] >> shifts) & np.uint32(2 ** self.bits - 1)
        return positions.reshape(indices.shape[0], -1)[:, :count].astype(np.uint8)

    def densify(self, values: np.ndarray, indices: np.ndarray, in_features: int) -> np.ndarray:
        """What the ``densify`` IR op computes: f32 ``[N, in_features]``."""
        rows, count = values.shape
        positions = self.unpack(indices, count).astype(np.int64)
        columns = (np.arange(count) // self.n * self.m)[None, :] + positions
        dense = np.zeros((rows, in_features), np.float32)
        np.add.at(dense, (np.arange(rows)[:, None], columns), values.astype(np.float32))
        return dense


def parse_nm(text: str, where: str) -> NMFormat:
    """``"2:4"`` as an NMFormat; an LLMOptError naming ``where`` otherwise."""
    n, sep, m = text.strip().partition(":")
    try:
        if not sep:
            raise ValueError
        return NMFormat(int(n), int(m))
    except ValueError:
        raise LLMOptError(f"{where}: {text!r} is not N:M.", "Write N:M with 0 < N < M, e.g. 2:4.") from None
