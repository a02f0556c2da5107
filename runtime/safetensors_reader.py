"""Read safetensors tensors with plain file reads, one at a time.

``safetensors``' numpy loader maps the file into memory, so every page it touches counts in the
process's resident memory on top of the device copy the runtime makes: loading a model would
cost twice its size. Reading each tensor into a fresh buffer keeps the peak at the device copies
plus one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

# safetensors dtype -> numpy dtype (the ones an artifact stores)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U32": np.uint32, "BOOL": np.bool_}


def read_header(path: Path) -> tuple[dict, int]:
    """(header without metadata, offset of the data section)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for ``names`` in order; KeyError for a name the file lacks."""
    header, data_start = read_header(path)
    with path.open("rb") as f:
        for name in names:
            info = header[name]
            start, end = info["data_offsets"]
            array = np.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            f.seek(data_start + start)
            if f.readinto(memoryview(array).cast("B")) != end - start or array.nbytes != end - start:
                raise ValueError(f"{path}: tensor {name} is cut short")
            yield name, array
