"""Value types of the IR: a dtype name and a shape whose dims are ints or symbolic sums.

A symbolic dim is a string holding a canonical sum of symbols and an integer, e.g. ``"seq"``,
``"past + seq"`` or ``"past + 1"``. Sums are enough for LLM graphs (a KV cache grows by
concatenation); anything else is written out by the frontend as a concrete reshape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

Dim = Union[int, str]

# IR dtype name -> numpy dtype. bf16 weights are widened on import (numpy has no bf16).
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "f16": np.dtype(np.float16),
    "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "u8": np.dtype(np.uint8),
    "u32": np.dtype(np.uint32),
    "bool": np.dtype(np.bool_),
}
TVM_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i8": "int8", "i32": "int32",
              "i64": "int64", "u8": "uint8", "u32": "uint32", "bool": "bool"}


def dtype_of_numpy(dtype: np.dtype) -> str:
    """IR dtype name of a numpy dtype."""
    for name, np_dtype in DTYPES.items():
        if np_dtype == np.dtype(dtype):
            return name
    raise TypeError(f"numpy dtype {dtype} has no IR dtype; known: {', '.join(DTYPES)}")


def _terms(dim: Dim) -> tuple[dict[str, int], int]:
    """Split a dim into ({symbol: coefficient}, constant)."""
    if isinstance(dim, int):
        return {}, dim
    symbols: dict[str, int] = {}
    constant = 0
    for term in dim.split("+"):
        term = term.strip()
        if term.lstrip("-").isdigit():
            constant += int(term)
        elif not term.isidentifier():
            raise ValueError(f"bad symbolic dim {dim!r}: terms must be identifiers or integers")
        else:
            symbols[term] = symbols.get(term, 0) + 1
    return symbols, constant


def _join(symbols: dict[str, int], constant: int) -> Dim:
    parts = [name for name in sorted(symbols) for _ in range(symbols[name])]
    if not parts:
        return constant
    if constant:
        parts.append(str(constant))
    return " + ".join(parts)


def canonical_dim(dim: Dim) -> Dim:
    """The canonical form of a dim: ints stay ints, sums are sorted (``"seq + past"`` -> ``"past + seq"``)."""
    if isinstance(dim, (int, np.integer)):
        return int(dim)
    return _join(*_terms(dim))


def add_dims(a: Dim, b: Dim) -> Dim:
    """``a + b`` as a canonical dim."""
    sa, ca = _terms(a)
    sb, cb = _terms(b)
    for name, count in sb.items():
        sa[name] = sa.get(name, 0) + count
    return _join(sa, ca + cb)


def eval_dim(dim: Dim, env: dict[str, int]) -> int:
    """The value of a dim given values for its symbols."""
    symbols, constant = _terms(dim)
    try:
        return constant + sum(env[name] * count for name, count in symbols.items())
    except KeyError as missing:
        raise ValueError(f"symbolic dim {dim!r} uses {missing} which has no value") from None


@dataclass(frozen=True)
class TensorType:
    """dtype + shape of one IR value. Rank-0 tensors (scalars) have shape ``()``."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(canonical_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        if not self.is_static:
            raise ValueError(f"{self} has symbolic dims")
        return int(np.prod(self.shape, dtype=np.int64))

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def parse_type(text: str) -> TensorType:
    """Inverse of ``str(TensorType)``: ``"f32[1, past + seq, 64]"``."""
    text = text.strip()
    if not text.endswith("]") or "[" not in text:
        raise ValueError(f"bad type {text!r}: expected dtype[dims], e.g. f32[1, seq, 576]")
    dtype, dims = text[:-1].split("[", 1)
    shape = tuple(int(d) if d.strip().lstrip("-").isdigit() else d.strip()
                  for d in dims.split(",") if d.strip())
    return TensorType(dtype.strip(), shape)
