"""External weights: a name -> (type, loader) table. Graphs reference weights by name only.

Data is loaded when asked for (``get``) and not kept, so a module over a 7B model costs only its
table. Passes that make new weights (fusion, folding) register a derived entry whose loader
computes it from the entries it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .types import TensorType, dtype_of_numpy


class WeightError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class WeightEntry:
    type: TensorType
    load: Callable[[], np.ndarray]
    origin: str  # where the data comes from, for messages and provenance


class WeightStore:
    def __init__(self):
        self._entries: dict[str, WeightEntry] = {}

    def add(self, name: str, type: TensorType, load: Callable[[], np.ndarray], origin: str = "") -> None:
        self._entries[name] = WeightEntry(type, load, origin or name)

    def add_array(self, name: str, array: np.ndarray, origin: str = "") -> None:
        array = np.ascontiguousarray(array)
        self.add(name, TensorType(dtype_of_numpy(array.dtype), array.shape), lambda: array, origin)

    def entry(self, name: str) -> WeightEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise WeightError(f"weight {name!r} is not in the weight store") from None

    def type(self, name: str) -> TensorType:
        return self.entry(name).type

    def get(self, name: str) -> np.ndarray:
        """Load weight ``name``; checks the data against the declared type."""
        entry = self.entry(name)
        array = np.asarray(entry.load())
        if tuple(array.shape) != entry.type.shape or dtype_of_numpy(array.dtype) != entry.type.dtype:
            raise WeightError(f"weight {name!r} from {entry.origin} is {dtype_of_numpy(array.dtype)}"
                              f"{list(array.shape)}, but {entry.type} was declared")
        return array

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def subset(self, names) -> "WeightStore":
        """A store holding only ``names`` (e.g. what a final graph still references)."""
        store = WeightStore()
        for name in names:
            store._entries[name] = self.entry(name)
        return store
