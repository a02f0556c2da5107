"""How important each input channel of an o_proj / down_proj is, from calibration statistics: the
scores structured pruning ranks attention kv groups and MLP channels by.

Removing a structure removes input channels of the linear that reads it: query head ``h`` is the
o_proj columns ``h*D .. h*D+D-1``, MLP channel ``j`` the down_proj column ``j``. So both metrics
score those columns, from the linear's weight ``W[N, K]`` and its inputs ``X`` (every token of every
calibration sample):

- ``flap`` (FLaP, An et al. 2024): the fluctuation ``Var(X_j) * ||W[:, j]||^2``: how much the output
  moves with channel ``j`` around its mean (what bias compensation cannot restore);
- ``wanda-sp`` (the structured Wanda of the FLaP paper): ``sum_i |W_ij| * ||X_j||_2``.

A structure's raw score is the sum over its columns. For a global ranking, ``standardized`` turns
one layer's channel scores of one kind into z-scores (mean 0, sample std 1); FLaP's reference code
squares the attention fluctuation before standardizing, which ``structure_scores`` does too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("flap", "wanda-sp")


@dataclass(frozen=True)
class InputStats:
    """Per input channel over ``count`` tokens: ``mean``, population ``variance`` and ``square_sum``
    (sum of squares), float64."""

    count: int
    mean: np.ndarray
    variance: np.ndarray
    square_sum: np.ndarray

    @staticmethod
    def of(inputs: list[np.ndarray], in_features: int) -> "InputStats":
        """Statistics of every token of every sample; per-sample moments merged exactly (Chan et al.)."""
        count, mean = 0, np.zeros(in_features)
        m2, squares = np.zeros(in_features), np.zeros(in_features)
        for sample in inputs:
            rows = np.asarray(sample).reshape(-1, in_features).astype(np.float64)
            n, sample_mean = len(rows), rows.mean(axis=0)
            centered = rows - sample_mean
            delta, total = sample_mean - mean, count + n
            m2 += np.einsum("tk,tk->k", centered, centered) + delta ** 2 * count * n / total
            mean += delta * n / total
            squares += np.einsum("tk,tk->k", rows, rows)
            count = total
        return InputStats(count, mean, m2 / max(count, 1), squares)


def fluctuation(w: np.ndarray, stats: InputStats) -> np.ndarray:
    """FLaP's ``Var(X_j) * sum_i W_ij^2`` per input channel, float64 ``[K]``."""
    w = np.asarray(w, np.float64)
    return stats.variance * np.einsum("nk,nk->k", w, w)


def wanda_sp(w: np.ndarray, stats: InputStats) -> np.ndarray:
    """Structured Wanda's ``sum_i |W_ij| * ||X_j||_2`` per input channel, float64 ``[K]``."""
    return np.abs(np.asarray(w, np.float64)).sum(axis=0) * np.sqrt(stats.square_sum)


def channel_scores(metric: str, w: np.ndarray, stats: InputStats) -> np.ndarray:
    if metric == "flap":
        return fluctuation(w, stats)
    if metric == "wanda-sp":
        return wanda_sp(w, stats)
    raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")


def standardized(scores: np.ndarray) -> np.ndarray:
    """``(s - mean(s)) / std(s)`` with the sample std (ddof 1); all zeros when the scores are all equal."""
    scores = np.asarray(scores, np.float64)
    std = scores.std(ddof=1) if scores.size > 1 else 0.0
    return (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)


def group_columns(group: int, group_size: int, head_dim: int) -> np.ndarray:
    """The o_proj input columns of kv group ``group``: its ``group_size`` query heads of ``head_dim``."""
    width = group_size * head_dim
    return np.arange(group * width, (group + 1) * width)


def group_sums(columns: np.ndarray, kv_heads: int) -> np.ndarray:
    """Sum of per-column scores ``[kv_heads * G * D]`` over each kv group's columns -> ``[kv_heads]``."""
    return np.asarray(columns, np.float64).reshape(kv_heads, -1).sum(axis=1)


def structure_scores(metric: str, kind: str, columns: np.ndarray, global_ranking: bool) -> np.ndarray:
    """Per-column scores ready for aggregation: raw, or (global ranking) standardized within the
    layer (after squaring for FLaP's attention, as its reference code does)."""
    if not global_ranking:
        return np.asarray(columns, np.float64)
    if metric == "flap" and kind == "attention":
        columns = np.asarray(columns, np.float64) ** 2
    return standardized(columns)
