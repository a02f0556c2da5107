"""``prune-magnitude``: zero the weights of smallest absolute value, without calibration.

Score ``|W_ij|``; unstructured levels compare scores over the whole weight (``scope=layer``, the
default, as magnitude pruning is usually done) or within each output row (``scope=row``); N:M keeps
the N largest of every M consecutive inputs of a row.

Requires: verified IR. Guarantees: each linear the rules select (all but ``lm_head`` by default) that
reads a stored f32 weight reads instead a derived f32 weight ``<weight>.pruned-<level>`` of the same
shape: the original with exactly ``floor(sparsity * size)`` weights (of the layer or of each row)
set to zero, or N:M-sparse; the others are unchanged. Linears whose inputs N:M does not divide stay
dense. The original weights stay in the store until ``dce``. Stats: see ``Pruning`` (``pruned``
linears, ``weights_pruned``, ``params``, ``zeros``, achieved ``sparsity``, ``skipped_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LLMOptError
from .frame import Pruning, magnitude_pruned
from .levels import Level
from .masks import SCOPES


@dataclass(frozen=True)
class PruneMagnitude(Pruning):
    """Magnitude pruning of linear weights."""

    name = "prune-magnitude"
    scope: str = "layer"

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in SCOPES:
            raise LLMOptError(f"prune-magnitude: scope={self.scope!r} is not one of {', '.join(SCOPES)}.",
                              "Use scope=layer (one threshold per weight) or scope=row (per output row).")

    def prune_weight(self, w: np.ndarray, inputs: list[np.ndarray] | None, level: Level) -> np.ndarray:
        return magnitude_pruned(w, level, self.scope)
