"""Refuse weights holding NaN or Inf where they are read, so a damaged checkpoint stops the build
with its file and weight named (instead of an artifact that generates garbage).

The check runs over the f32 values a reader has just produced, a chunk at a time, so it costs one
pass over memory already in use and never a full-size mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelInputError

CHECK_CHUNK_VALUES = 1 << 22
DAMAGED_HINT = ("The checkpoint is damaged (or was saved after training diverged): download it again, or "
                "re-export it from the original model.")


def check_finite(values: np.ndarray, path: str | Path, weight: str) -> None:
    """Raise ModelInputError naming ``path`` and ``weight`` if ``values`` holds NaN or Inf: how many
    of each, and the index (in ``values``' shape) of the first."""
    flat = values.reshape(-1)
    nans = infs = 0
    first = None
    for start in range(0, flat.size, CHECK_CHUNK_VALUES):
        chunk = flat[start:start + CHECK_CHUNK_VALUES]
        finite = np.isfinite(chunk)
        if finite.all():
            continue
        if first is None:
            first = start + int(np.argmin(finite))
        chunk_nans = int(np.count_nonzero(np.isnan(chunk)))
        nans += chunk_nans
        infs += int(finite.size - np.count_nonzero(finite)) - chunk_nans
    if first is None:
        return
    index = [int(i) for i in np.unravel_index(first, values.shape)]
    counts = " and ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "Inf")) if n)
    raise ModelInputError(f"{path}: weight {weight!r} holds {counts} value(s) of {flat.size} "
                          f"(the first at index {index}).", DAMAGED_HINT)
