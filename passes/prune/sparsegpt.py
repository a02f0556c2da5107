"""``prune-sparsegpt``: SparseGPT (Frantar & Alistarh 2023), one-shot pruning with OBS weight
updates, calibrated on text.

For each linear, with ``X`` its inputs on the calibration set, SparseGPT approximately minimizes
``||X W^T - X W_s^T||`` over weights ``W_s`` of the requested sparsity: it visits input columns in
order, zeroes the pruned weights of each column, and spreads the error over the columns not visited
yet in proportion to their correlation with it (the inverse Hessian), as GPTQ does for rounding:

- ``H = 2/n X^T X`` in float64 (``quant/gptq.py``'s ``hessian``), a dead input (``H_jj == 0``) gets
  ``H_jj = 1`` and its weights set to 0; ``damp`` times the mean of ``diag(H)`` is added to the
  diagonal; ``U`` is the upper Cholesky factor of ``H^-1`` (see ``inverse_cholesky``).
- Columns go in blocks of ``block_size`` (128). Unstructured: when a block starts, its mask is chosen
  over the whole block (all rows, the block's columns) from the current, error-updated weights by
  the saliency ``w^2 / U_jj^2``: the block drops exactly ``floor(s*N*end) - floor(s*N*start)`` of
  its lowest (adaptive mask selection; the whole weight ends with exactly ``floor(s*N*K)`` zeros).
  N:M: every ``M`` columns (absolute index ``j % M == 0``) each row keeps the N of highest saliency
  in those columns (blocks are cut at a multiple of ``M``).
- Column ``j``: the pruned weights become 0, the scaled error ``(w_j - q_j) / U_jj`` updates the
  block's later columns at once (row ``j`` of ``U``) and the columns after the block in one matrix
  product when the block is done. Pruned weights are exactly zero and stay so.

The loop runs in float32 once ``U`` is known. Options: ``damp`` (fraction of the mean of
``diag(H)``, default 0.01), ``block_size`` (128), and those of every pruning pass (see
``frame.py``).

Requires: verified IR, a ``prefill`` entry point taking ``ids`` and ``pos``. Guarantees: as
``prune-magnitude`` (exact sparsity per weight, or N:M), the kept weights updated by SparseGPT for
every weight calibration reached (each calibrated on the outputs of the already-pruned layers
before it); magnitude per row for the others. Stats: those of ``prune-magnitude`` plus
``calibrated`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LLMOptError
from ..quant.gptq import hessian, inverse_cholesky
from .frame import CalibratedPruning
from .levels import Level
from .masks import drop_lowest, nm_mask


def sparsegpt(w: np.ndarray, h: np.ndarray, level: Level, block_size: int = 128, damp: float = 0.01) -> np.ndarray:
    """SparseGPT of ``w[N, K]`` given its inputs' float64 Hessian ``h[K, K]`` (changed in place)."""
    n, k = w.shape
    w = np.array(w, np.float32)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    upper = inverse_cholesky(h, damp).astype(np.float32)
    diagonal = np.diag(upper)
    rows = np.ascontiguousarray(w.T)  # [K, N]: column j of w is row j, contiguous
    block = max(level.m, block_size // level.m * level.m) if level.is_nm else block_size

    def saliency(first: int, end: int) -> np.ndarray:
        """``w^2 / U_jj^2`` of columns ``first..end-1`` as they are now, ``[end - first, N]``."""
        return rows[first:end] ** 2 / diagonal[first:end, None] ** 2

    for start in range(0, k, block):
        end = min(start + block, k)
        if level.is_nm:
            keep = np.ones((end - start, n), bool)
        else:
            count = level.pruned_count(n * end) - level.pruned_count(n * start)
            keep = drop_lowest(saliency(start, end).reshape(-1), count).reshape(end - start, n)
        errors = np.empty((end - start, n), np.float32)
        for j in range(start, end):
            if level.is_nm and j % level.m == 0:
                keep[j - start:j - start + level.m] = nm_mask(saliency(j, j + level.m).T, level.n, level.m).T
            column = rows[j]
            kept = np.where(keep[j - start], column, np.float32(0))
            errors[j - start] = (column - kept) / diagonal[j]
            rows[j] = kept
            rows[j + 1:end] -= np.outer(upper[j, j + 1:end], errors[j - start])
        rows[end:] -= upper[start:end, end:].T @ errors  # the lazy batch update
    return np.ascontiguousarray(rows.T)


@dataclass(frozen=True)
class PruneSparseGPT(CalibratedPruning):
    """SparseGPT pruning of linear weights on calibration inputs."""

    name = "prune-sparsegpt"
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.damp < 0 or self.block_size < 1:
            raise LLMOptError(f"prune-sparsegpt: damp={self.damp} must be >= 0 and block_size={self.block_size} >= 1.",
                              "Use e.g. damp=0.01 and block_size=128.")

    def prune_weight(self, w: np.ndarray, inputs: list[np.ndarray] | None, level: Level) -> np.ndarray:
        return sparsegpt(w, hessian(inputs, w.shape[1]), level, self.block_size, self.damp)
