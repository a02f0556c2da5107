"""Low-rank factorization of linear weights: ``W ~ A @ B``, a linear becoming two (``lowrank-svd``:
truncated SVD; ``lowrank-asvd``: activation-aware, whitened by the inputs' second moment), with ranks
for a parameter budget (uniform or by spectral energy)."""

from .allocation import ALLOCATIONS, Target, energy_ranks, uniform_ranks
from .asvd import LowRankASVD
from .factorize import factor_names, factorize_linears
from .factors import (break_even_rank, saves, second_moment, singular_values, truncated_svd, uniform_rank,
                      whitened_singular_values, whitened_svd, whitening)
from .frame import CalibratedLowRank, LowRank
from .spec import LOWRANK_METHODS, lowrank_pass
from .svd import LowRankSVD

__all__ = ["ALLOCATIONS", "Target", "energy_ranks", "uniform_ranks", "LowRankASVD", "factor_names",
           "factorize_linears", "break_even_rank", "saves", "second_moment", "singular_values", "truncated_svd",
           "uniform_rank", "whitened_singular_values", "whitened_svd", "whitening", "CalibratedLowRank", "LowRank",
           "LOWRANK_METHODS", "lowrank_pass", "LowRankSVD"]
