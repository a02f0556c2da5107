"""``lowrank-asvd``: activation-aware factorization of linear weights (SVD-LLM's truncation-aware
whitening, Wang et al. 2024), calibrated on text.

With ``X`` a linear's inputs on the calibration set (``n`` tokens), ``C = X^T X / n`` (float64) plus
``damp`` times the mean of ``diag(C)`` on the diagonal, and ``C = L L^T`` (Cholesky; ``damp`` grows
tenfold while ``C`` is not positive definite): ``W L = U S V^T``, ``A = U_r S_r``, ``B = V_r^T L^-1``.
This ``A B`` minimizes the output error ``||(W - W') X^T||`` over rank-``r`` ``W'`` (for the damped
``C``), and the error is ``sqrt(n * sum of the dropped s_i^2)``: the whitened singular values are what
truncation costs, which ``allocation=energy`` ranks by.

Options: ``damp`` (default 0.01), and those of every low-rank pass (``frame.py``).

Requires: verified IR, a ``prefill`` entry point taking ``ids`` and ``pos``. Guarantees: as
``lowrank-svd`` (derived weights ``<weight>.asvd-r<r>.b`` and ``.a``), with the factors whitened by
each weight's inputs wherever calibration reached it (each calibrated on the outputs of the
already-factorized linears before it); the plain truncated SVD for the others. Stats: those of
``lowrank-svd`` plus ``calibrated`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LLMOptError
from .factors import second_moment, singular_values, truncated_svd, whitened_singular_values, whitened_svd, whitening
from .frame import CalibratedLowRank


@dataclass(frozen=True)
class LowRankASVD(CalibratedLowRank):
    """Activation-aware (whitened) SVD factorization of linear weights on calibration inputs."""

    name = "lowrank-asvd"
    method = "asvd"
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if not self.damp >= 0:
            raise LLMOptError(f"lowrank-asvd: damp={self.damp} must be >= 0.", "Use e.g. damp=0.01.")

    def factors(self, w: np.ndarray, inputs: list[np.ndarray] | None, rank: int) -> tuple[np.ndarray, np.ndarray]:
        if inputs is None:
            return truncated_svd(w, rank)
        return whitened_svd(w, whitening(second_moment(inputs, w.shape[1]), self.damp), rank)

    def spectrum(self, w: np.ndarray, inputs: list[np.ndarray] | None) -> np.ndarray:
        if inputs is None:
            return singular_values(w)
        return whitened_singular_values(w, whitening(second_moment(inputs, w.shape[1]), self.damp))
