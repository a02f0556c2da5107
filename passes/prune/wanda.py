"""``prune-wanda``: Wanda, pruning by weights and activations (Sun et al. 2023), calibrated on text.

Score ``|W_ij| * ||X_j||_2``, with ``||X_j||_2`` the L2 norm of input feature ``j`` over every token
of every calibration sample (accumulated in float64). Unstructured levels compare scores within each
output row (``scope=row``, the paper's choice; ``scope=layer`` compares over the whole weight); N:M
keeps the N highest of every M consecutive inputs of a row. The kept weights are not changed.

Requires: verified IR, a ``prefill`` entry point taking ``ids`` and ``pos``. Guarantees: as
``prune-magnitude``, with masks from Wanda's score for every weight calibration reached (each
calibrated on the outputs of the already-pruned layers before it) and from ``|W|`` per row for the
others. Stats: those of ``prune-magnitude`` plus ``calibrated`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LLMOptError
from .frame import CalibratedPruning
from .levels import Level
from .masks import SCOPES, keep_mask


def input_norms(inputs: list[np.ndarray], in_features: int) -> np.ndarray:
    """``||X_j||_2`` over all tokens of all samples, float64 ``[K]``."""
    squares = np.zeros(in_features, np.float64)
    for sample in inputs:
        rows = np.asarray(sample).reshape(-1, in_features).astype(np.float64)
        squares += np.einsum("tk,tk->k", rows, rows)
    return np.sqrt(squares)


def wanda_scores(w: np.ndarray, inputs: list[np.ndarray]) -> np.ndarray:
    """``|W_ij| * ||X_j||_2``, float64 ``[N, K]``."""
    return np.abs(np.asarray(w, np.float64)) * input_norms(inputs, w.shape[1])[None, :]


@dataclass(frozen=True)
class PruneWanda(CalibratedPruning):
    """Wanda pruning of linear weights on calibration inputs."""

    name = "prune-wanda"
    scope: str = "row"

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in SCOPES:
            raise LLMOptError(f"prune-wanda: scope={self.scope!r} is not one of {', '.join(SCOPES)}.",
                              "Use scope=row (the paper's per-output comparison) or scope=layer.")

    def prune_weight(self, w: np.ndarray, inputs: list[np.ndarray] | None, level: Level) -> np.ndarray:
        w = np.asarray(w, np.float32)
        return np.where(keep_mask(wanda_scores(w, inputs), level, self.scope), w, np.float32(0))
