"""Which weights to keep, from a score per weight (higher: more important): boolean masks of the
shape of ``scores[N, K]`` (out_features, in_features), True where the weight is kept.

- unstructured, ``scope="row"``: each output row drops its ``floor(sparsity * K)`` lowest scores
  (Wanda compares scores within an output row);
- unstructured, ``scope="layer"``: the whole matrix drops its ``floor(sparsity * N * K)`` lowest
  scores (layer-wise magnitude pruning);
- N:M: each run of ``M`` consecutive inputs of a row (columns ``M*g .. M*g+M-1``) keeps its ``N``
  highest scores, so exactly ``M - N`` of every ``M`` are dropped.

Ties are broken by position: among equal scores the earlier weight (row-major) is dropped first, so
the sparsity is exact and masks are deterministic.
"""

from __future__ import annotations

import numpy as np

from .levels import Level

SCOPES = ("row", "layer")


def drop_lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Keep-mask over the last axis of ``scores`` dropping its ``count`` lowest, ties dropped earliest
    first (what a stable ascending sort would drop), in linear time: every score below the
    ``count``-th smallest, then the first of those equal to it."""
    keep = np.ones(scores.shape, bool)
    if count <= 0:
        return keep
    if count >= scores.shape[-1]:
        return ~keep
    kth = np.partition(scores, count - 1, axis=-1)[..., count - 1:count]
    below, ties = scores < kth, scores == kth
    needed = count - below.sum(axis=-1, keepdims=True)
    return ~(below | (ties & (np.cumsum(ties, axis=-1) <= needed)))


def unstructured_mask(scores: np.ndarray, sparsity: float, scope: str = "row") -> np.ndarray:
    """Keep-mask dropping a ``sparsity`` fraction of each row (``row``) or of the matrix (``layer``)."""
    level = Level(sparsity=sparsity)
    level.check()
    if scope == "row":
        return drop_lowest(scores, level.pruned_count(scores.shape[-1]))
    if scope == "layer":
        return drop_lowest(scores.reshape(-1), level.pruned_count(scores.size)).reshape(scores.shape)
    raise ValueError(f"unknown mask scope {scope!r} (known: {', '.join(SCOPES)})")


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask keeping the ``n`` highest of every ``m`` consecutive scores of each row."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"N:M pruning needs in_features ({k}) to be a multiple of M ({m})")
    return drop_lowest(scores.reshape(rows, k // m, m), m - n).reshape(rows, k)


def keep_mask(scores: np.ndarray, level: Level, scope: str = "row") -> np.ndarray:
    """The keep-mask of ``level`` (``scope`` applies to unstructured levels only)."""
    return nm_mask(scores, level.n, level.m) if level.is_nm else unstructured_mask(scores, level.sparsity, scope)
