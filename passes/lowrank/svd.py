"""``lowrank-svd``: factorize linear weights by truncated SVD, without calibration.

``W[N, K] = U S V^T`` becomes ``A = U_r S_r`` ``[N, r]`` and ``B = V_r^T`` ``[r, K]``: the best rank-``r``
approximation of ``W`` in Frobenius norm (Eckart-Young), whatever the inputs. ``allocation=energy``
ranks by ``W``'s own singular values.

Requires: verified IR. Guarantees: each linear the rules select (all but ``lm_head`` by default)
that reads a stored f32 weight ``[N, K]`` whose rank ``r`` saves weights (``r (N + K) < N K``; rank
from ``ratio`` or ``rank``, see ``frame.py``) is replaced by ``linear(linear(x, B), A)`` (bias, if any,
on the second) reading the derived f32 weights ``<weight>.svd-r<r>.b`` and ``.a``; the other linears
are unchanged. Outputs change by the truncation only. The original weights stay in the store until
``dce``. Stats: see ``LowRank`` (``factorized``, ``weights_factorized``, ``kept_dense``,
``params_before``, ``params_after``, ``reduction``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .factors import truncated_svd
from .frame import LowRank


@dataclass(frozen=True)
class LowRankSVD(LowRank):
    """Truncated-SVD factorization of linear weights."""

    name = "lowrank-svd"
    method = "svd"

    def factors(self, w: np.ndarray, inputs: list[np.ndarray] | None, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return truncated_svd(w, rank)
