"""``quantize-gptq``: GPTQ weight quantization (Frantar et al. 2022), calibrated on text.

For each linear, with ``X`` its inputs on the calibration set (every token of every sample), GPTQ
minimizes ``||X W^T - X Q^T||`` over the scheme's codes ``Q`` approximately: it rounds one input
column at a time and spreads that column's rounding error over the columns not rounded yet, in
proportion to their correlation with it (the inverse of the Hessian ``H = 2/n X^T X``):

- ``H`` is accumulated in float64; a dead column (``H_ii == 0``, its input is always 0) gets
  ``H_ii = 1`` and its weights set to 0; ``damp`` times the mean of ``diag(H)`` is added to the
  diagonal; ``U`` is the upper Cholesky factor of ``H^-1``.
- Columns are visited in blocks of ``block_size``: column ``j`` is rounded on its group's grid, its
  error ``(w_j - q_j) / U_jj`` updates the block's later columns at once (row ``j`` of ``U``) and
  the columns after the block in one matrix product when the block is done (the "lazy batch").
- A group's grid (scale and, asymmetric, zero point; for codebook schemes the codebook's scale)
  is chosen from the group's current, error-updated weights when the first of its columns is
  reached; with ``static_groups``, from the original weights before the loop. A short last group
  (the group size does not divide ``K``) gets its grid from its own columns only. With ``mse_grid``
  (the ``mse`` option of the reference implementation, IST-DASLab/gptq) it is the best of
  ``Scheme.grid`` of the group's range shrunk by a factor in 0.21..1 (steps of 0.05, then 0.01
  around the best): the one with the least ``sum |w - q|^2.4`` (clipping a few outliers to round
  the rest finer); otherwise ``Scheme.grid`` itself.
- ``act_order`` visits columns by decreasing ``H_ii`` (inputs with the most energy first). Groups
  stay consecutive input features, as the scheme stores them, so act-order costs nothing at run
  time (unlike formats that keep a group index per column) and is on by default.

Sparse weights (joint sparse + quantization, as in SparseGPT's joint mode). With ``keep_zeros``
(default on), the weights stored as exactly 0 (a pruning pass's mask: ``prune-*`` passes leave pruned
weights exactly 0, and a dense weight rarely holds an exact 0, which then simply stays 0) are the
mask: when its column is reached, a masked weight's quantized value is 0 (the code of 0 on its
group's grid) and its error ``(w_j - 0) / U_jj``, where ``w_j`` is its current, error-updated value,
is spread over the later columns like any rounding error; the other weights are rounded as above. A
group's grid is chosen with its masked weights at 0, so 0 is on it: symmetric integer grids have
the code of 0 anyway, an asymmetric grid's integer zero point lies in the code range because the
group's range contains 0, and codebook schemes need a level 0 (NF4 and FP8 have one; a codebook
without one is an error). The dequantized weight is checked to be exactly 0 at every masked
position, so N:M patterns and unstructured masks survive quantization. ``keep_zeros=false`` is plain
GPTQ, whose error updates refill pruned weights.

The codes, scales and zeros are exactly the scheme's format: ``Scheme.dequantize`` of the result
is what the rewritten graph computes. The error-spreading loop runs in float32 once ``U`` is known.

Options: ``damp`` (fraction of the mean of ``diag(H)``, default 0.01), ``block_size`` (128),
``act_order`` (True), ``static_groups`` (False), ``mse_grid`` (True), ``keep_zeros`` (True), and
those of every calibrated pass (``scheme``, ``rules``, ``calibration``, ``samples``, ``seq_len``,
``seed``; see ``calibrated.py``). ``act_order=false,mse_grid=false`` is textbook GPTQ.

Requires: verified IR, a ``prefill`` entry point taking ``ids`` and ``pos``. Guarantees: as
``quantize-rtn``, with GPTQ's codes for every linear calibration reached (round-to-nearest for the
others); with ``keep_zeros``, every weight stored as exactly 0 dequantizes to exactly 0. Stats: those
of ``quantize-rtn`` plus ``calibrated`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from ...errors import LLMOptError
from ...ir.quant_schemes import QuantizedWeight, Scheme
from .calibrated import CalibratedQuantization

ChooseGrid = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]

HESSIAN_CHUNK = 4096  # tokens per float32 product
COARSE_FACTORS = 1 - np.arange(16, dtype=np.float32) / 20  # 1.00, 0.95, ..., 0.25
FINE_STEPS = np.array([-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04], np.float32)
GRID_NORM = 2.4
DAMP_RETRIES, MIN_RETRY_DAMP = 5, 1e-4  # see inverse_cholesky


def hessian(inputs: list[np.ndarray], in_features: int) -> np.ndarray:
    """``2/n * sum X^T X`` over all ``n`` tokens of all samples, float64 ``[K, K]``: products of
    up to ``HESSIAN_CHUNK`` tokens in float32, summed in float64."""
    rows = np.concatenate([np.asarray(sample, np.float32).reshape(-1, in_features) for sample in inputs])
    h = np.zeros((in_features, in_features), np.float64)
    for start in range(0, len(rows), HESSIAN_CHUNK):
        chunk = rows[start:start + HESSIAN_CHUNK]
        h += chunk.T @ chunk
    return h * (2.0 / max(len(rows), 1))


def inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(h + damp * mean(diag h) * I)^-1`` (``U^T U``), float64.
    When that matrix is not positive definite (too few calibration tokens for ``K``, ``damp=0``),
    ``damp`` grows tenfold (from at least ``MIN_RETRY_DAMP``) up to ``DAMP_RETRIES`` times.

    Computed as ``J L^-1 J``, ``L`` the lower Cholesky factor of ``J H J`` (``J`` reverses the order):
    ``H^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular. One
    factorization and one triangular solve, with torch's LAPACK (numpy's Cholesky and LAPACK's
    ``potri`` slow down tenfold when the cores are shared). Shared by GPTQ and SparseGPT."""
    import torch
    h = torch.from_numpy(h).flip(0, 1)
    eye = torch.eye(len(h), dtype=h.dtype)
    mean_diagonal = float(h.diagonal().mean())
    for retry in range(DAMP_RETRIES + 1):
        fraction = damp if retry == 0 else max(damp, MIN_RETRY_DAMP) * 10 ** retry
        lower, info = torch.linalg.cholesky_ex(h + fraction * mean_diagonal * eye)
        if info == 0:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1).numpy()
    raise LLMOptError(f"the inputs' Hessian is not positive definite even with damp={fraction:.3g}.",
                      "Calibrate on more or longer samples, or raise the pass option damp.")


def searched_grid(scheme: Scheme, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The grid of each group (last axis) that rounds it best: ``scheme.grid`` of the group shrunk
    by the factor with the least ``sum |w - q|^GRID_NORM``, searched coarse (``COARSE_FACTORS``)
    then fine (``FINE_STEPS`` around the best coarse factor); ties keep the wider grid."""
    best_factor = np.ones(groups.shape[:-1], np.float32)
    best_error = np.full(groups.shape[:-1], np.inf, np.float32)

    def consider(factor: np.ndarray) -> None:
        nonlocal best_factor, best_error
        scale, zero = scheme.grid(groups * factor[..., None])
        rounded = scheme.decode(scheme.encode(groups, scale, zero), scale, zero)
        error = (np.abs(rounded - groups) ** GRID_NORM).sum(axis=-1)
        better = error < best_error
        best_factor, best_error = np.where(better, factor, best_factor), np.where(better, error, best_error)

    for factor in COARSE_FACTORS:
        consider(np.full(best_factor.shape, factor, np.float32))
    coarse = best_factor
    for step in FINE_STEPS:
        consider(np.minimum(coarse + step, np.float32(1)))
    return scheme.grid(groups * best_factor[..., None])


@dataclass(frozen=True)
class QuantizeGPTQ(CalibratedQuantization):
    """Quantize linear weights with GPTQ on calibration inputs; the graph dequantizes them."""

    name = "quantize-gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    mse_grid: bool = True
    keep_zeros: bool = True

    def __post_init__(self):
        if self.damp < 0 or self.block_size < 1:
            raise LLMOptError(f"quantize-gptq: damp={self.damp} must be >= 0 and block_size={self.block_size} >= 1.",
                              "Use e.g. damp=0.01 and block_size=128.")

    def quantize_weight(self, w: np.ndarray, inputs: list[np.ndarray], scheme: Scheme) -> QuantizedWeight:
        return self.quantize_with_hessian(w, hessian(inputs, w.shape[1]), scheme)

    def quantize_with_hessian(self, w: np.ndarray, h: np.ndarray, scheme: Scheme) -> QuantizedWeight:
        """GPTQ of ``w[N, K]`` given its inputs' float64 Hessian ``h[K, K]`` (changed in place)."""
        k = w.shape[1]
        w = np.array(w, np.float32)
        pruned = zero_mask(w, scheme) if self.keep_zeros else None
        dead = np.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        order = np.argsort(-np.diag(h), kind="stable") if self.act_order else np.arange(k)
        upper = inverse_cholesky(h[np.ix_(order, order)], self.damp).astype(np.float32)
        choose = partial(searched_grid, scheme) if self.mse_grid else scheme.grid
        quantized = _GPTQColumns(scheme, w, order, upper, self.block_size, choose, self.static_groups, pruned).run()
        if pruned is not None:
            check_zeros_kept(scheme, quantized, pruned)
        return quantized


def zero_mask(w: np.ndarray, scheme: Scheme) -> np.ndarray | None:
    """Where ``w`` is exactly 0 (the weights ``keep_zeros`` keeps at 0), or None when nowhere. A
    codebook without a level 0 cannot keep them: an LLMOptError."""
    pruned = w == 0
    if not pruned.any():
        return None
    if scheme.codebook is not None and 0.0 not in scheme.codebook:
        raise LLMOptError(f"quantize-gptq: scheme {scheme.name}'s codebook has no level 0, so the weights "
                          "stored as 0 (pruned) cannot stay 0.",
                          "Use a scheme with an exact 0 (integer schemes, nf4, fp8) or the option keep_zeros=false.")
    return pruned


def check_zeros_kept(scheme: Scheme, quantized: QuantizedWeight, pruned: np.ndarray) -> None:
    """Raise when a weight of the mask ``pruned`` does not dequantize to exactly 0 (a broken
    invariant of the column loop, not a user error)."""
    lost = int(np.count_nonzero(scheme.dequantize(quantized)[pruned]))
    if lost:
        raise AssertionError(f"quantize-gptq ({scheme.name}): {lost} pruned weights do not dequantize to 0")


class _GPTQColumns:
    """The column loop of one weight. Works on ``w^T`` permuted to visiting order (row ``j`` holds
    the ``j``-th column visited, contiguous), records codes and grids in the original order. With
    ``pruned`` (``[N, K]``, True where the weight is kept at 0) those weights round to 0."""

    def __init__(self, scheme: Scheme, w: np.ndarray, order: np.ndarray, upper: np.ndarray, block_size: int,
                 choose: ChooseGrid, static_groups: bool, pruned: np.ndarray | None = None):
        n, k = w.shape
        self.scheme, self.order, self.upper, self.block_size, self.choose = scheme, order, upper, block_size, choose
        self.group = scheme.group_of(k)
        self.rows = np.ascontiguousarray(w.T[order])  # [K, N] in visiting order
        self.position = np.argsort(order)  # original column -> visiting position
        self.pruned = None if pruned is None else np.ascontiguousarray(pruned.T[order])  # [K, N] like rows
        groups = scheme.groups(k)  # the last one short when the group size does not divide k
        self.codes = np.zeros((n, k), np.uint8)
        self.scales = np.zeros((n, groups), np.float32)
        self.zeros = np.zeros((n, groups), np.float32) if scheme.has_zeros else None
        self.has_grid = np.zeros(groups, bool)
        if static_groups:
            for group in range(groups):
                self.set_grid(group, *choose(w[:, group * self.group:(group + 1) * self.group]))

    def run(self) -> QuantizedWeight:
        k = len(self.rows)
        for start in range(0, k, self.block_size):
            end = min(start + self.block_size, k)
            errors = np.empty((end - start, self.rows.shape[1]), np.float32)
            for j in range(start, end):
                errors[j - start] = self.round_column(j, start, errors)
                self.rows[j + 1:end] -= np.outer(self.upper[j, j + 1:end], errors[j - start])
            self.rows[end:] -= self.upper[start:end, end:].T @ errors  # the lazy batch update
        return QuantizedWeight(self.codes, self.scales, self.zeros)

    def round_column(self, j: int, block_start: int, errors: np.ndarray) -> np.ndarray:
        """Round the ``j``-th visited column on its group's grid (its pruned weights to 0); its
        scaled error."""
        column = self.order[j]
        group = column // self.group
        if not self.has_grid[group]:
            self.choose_grid(group, j, block_start, errors)
        scale = self.scales[:, group]
        zero = self.zeros[:, group] if self.zeros is not None else None
        values = self.rows[j][:, None]
        target = values if self.pruned is None else np.where(self.pruned[j][:, None], np.float32(0), values)
        codes = self.scheme.encode(target, scale, zero)
        self.codes[:, column] = codes[:, 0]
        return (values - self.scheme.decode(codes, scale, zero))[:, 0] / self.upper[j, j]

    def choose_grid(self, group: int, j: int, block_start: int, errors: np.ndarray) -> None:
        """The grid of ``group`` from its columns' current weights: the block's own columns are up
        to date, later ones still lack this block's errors so far (rows ``block_start..j-1``); pruned
        weights count as 0, so 0 is on the grid."""
        positions = self.position[group * self.group:(group + 1) * self.group]
        current = self.rows[positions]
        later = positions >= block_start + self.block_size
        if later.any() and j > block_start:
            current[later] -= self.upper[block_start:j, positions[later]].T @ errors[:j - block_start]
        if self.pruned is not None:
            current[self.pruned[positions]] = 0
        self.set_grid(group, *self.choose(current.T))

    def set_grid(self, group: int, scale: np.ndarray, zero: np.ndarray | None) -> None:
        self.scales[:, group] = scale
        if self.zeros is not None:
            self.zeros[:, group] = zero
        self.has_grid[group] = True
