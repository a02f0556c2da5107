"""An artifact's weights as numpy arrays, shard by shard, decoded where the manifest says they are
encoded (``weight_encoding``) and checked against the manifest's shape and dtype.

The runtime loader turns each into a device tensor as it comes (one array held at a time); tools and
tests read them the same way instead of opening the safetensors shards themselves.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from . import weight_encoding
from .errors import ArtifactError
from .manifest import Manifest, WeightInfo, read_manifest, resolve
from .safetensors_reader import read_tensors


def read_weights(artifact_dir: str | Path, manifest: Manifest | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index in manifest.weights, array)`` for every weight, shard by shard; an
    ArtifactError naming the shard if one is missing, cut short or does not match the manifest."""
    artifact_dir = Path(artifact_dir)
    manifest = manifest or read_manifest(artifact_dir)
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, w in enumerate(manifest.weights):
        by_file[w.file].append(i)
    for file, indices in by_file.items():
        path = resolve(artifact_dir, file)
        try:
            stored = read_tensors(path, [part for i in indices for part in _stored_names(manifest.weights[i])])
            for i in indices:
                w = manifest.weights[i]
                array = _read_weight(w, stored)
                if tuple(array.shape) != w.shape or str(array.dtype) != w.dtype:
                    raise ArtifactError(
                        f"{path}: tensor {w.name} is {array.dtype}{list(array.shape)}, "
                        f"the manifest says {w.dtype}{list(w.shape)}",
                        hint="rebuild the artifact",
                        path=path,
                    )
                yield i, array
                del array
        except KeyError as missing:
            raise ArtifactError(f"{path} has no tensor {missing}", hint="rebuild the artifact", path=path) from None
        except (ValueError, OSError) as err:
            raise ArtifactError(f"{path}: {err}", hint="rebuild the artifact", path=path) from None


def _stored_names(weight: WeightInfo) -> list[str]:
    """The shard tensors that hold `weight`: itself, or its encoding's mask and values."""
    return [weight.encoding.mask, weight.encoding.values] if weight.encoding else [weight.name]


def _read_weight(weight: WeightInfo, stored: Iterator[tuple[str, np.ndarray]]) -> np.ndarray:
    """`weight`'s array from the next tensors of `stored` (decoded when the manifest says so)."""
    if weight.encoding is None:
        return next(stored)[1]
    (_, mask), (_, values) = next(stored), next(stored)
    try:
        return weight_encoding.decode(weight.encoding, mask, values, weight.shape, weight.dtype)
    except ValueError as err:
        raise ValueError(f"encoded tensor {weight.name}: {err}") from None
