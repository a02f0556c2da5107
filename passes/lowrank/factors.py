"""Low-rank factors of one linear weight ``W[N, K]``: ``W ~ A @ B`` with ``A[N, r]`` and ``B[r, K]``,
so ``x @ W.T ~ (x @ B.T) @ A.T`` costs ``r * (N + K)`` weights instead of ``N * K``.

- ``truncated_svd(w, r)``: ``W = U S V^T``, ``A = U_r S_r``, ``B = V_r^T``: the best rank-``r``
  approximation in Frobenius norm (Eckart-Young), with error ``sqrt(sum of the dropped s_i^2)``.
- ``whitened_svd(w, lower, r)``: activation-aware, SVD-LLM's truncation-aware whitening. With ``X``
  the layer's inputs (``n`` rows), ``C = X^T X / n = L L^T`` (``lower``: its Cholesky factor, see
  ``whitening``), ``||(W - W') X^T||_F^2 = n ||(W - W') L||_F^2``: the best rank-``r`` ``W'`` for the
  layer's outputs is the truncated SVD of ``W L`` mapped back by ``L^-1``. ``W L = U S V^T``,
  ``A = U_r S_r``, ``B = V_r^T L^-1``; the output error is ``sqrt(n * sum of the dropped s_i^2)``.

Computed in float64 with torch's LAPACK on one thread (``one_thread``), returned as float32. Rank
arithmetic: ``break_even_rank`` (the largest rank that still saves weights) and
``uniform_rank`` (the rank that removes a given fraction of a weight's parameters).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from ..quant.gptq import DAMP_RETRIES, MIN_RETRY_DAMP, hessian


def break_even_rank(n: int, k: int) -> int:
    """The largest rank ``r`` with ``r * (n + k) < n * k``: factors of a higher rank save nothing."""
    return (n * k - 1) // (n + k)


def saves(n: int, k: int, rank: int) -> bool:
    """Whether rank-``rank`` factors of an ``[n, k]`` weight hold fewer weights than it (and rank >= 1)."""
    return 1 <= rank and rank * (n + k) < n * k


def uniform_rank(n: int, k: int, ratio: float) -> int:
    """The largest rank keeping at most ``(1 - ratio) * n * k`` weights: ``floor((1 - ratio) n k / (n + k))``."""
    return int(math.floor((1.0 - ratio) * n * k / (n + k) + 1e-9))


@contextmanager
def one_thread():
    """Run torch's LAPACK calls on one thread: the SVD's bidiagonalization synchronizes its threads
    after every small step, and when the cores are shared (other processes, a loaded TVM runtime's
    workers) each wait costs a time slice: an SVD of ``[3072, 576]`` took 11.7 s on two threads and
    0.28 s on one, on two busy cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _svd(matrix: np.ndarray):
    import torch
    with one_thread():
        u, s, vh = torch.linalg.svd(torch.from_numpy(np.asarray(matrix, np.float64)), full_matrices=False)
    return u.numpy(), s.numpy(), vh.numpy()


def singular_values(w: np.ndarray) -> np.ndarray:
    """``W``'s singular values, descending, float64."""
    import torch
    with one_thread():
        return torch.linalg.svdvals(torch.from_numpy(np.asarray(w, np.float64))).numpy()


def truncated_svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)``: ``A = U_r S_r`` ``[N, r]``, ``B = V_r^T`` ``[r, K]``, float32."""
    u, s, vh = _svd(w)
    return (u[:, :rank] * s[:rank]).astype(np.float32), np.ascontiguousarray(vh[:rank], np.float32)


def second_moment(inputs: list[np.ndarray], in_features: int) -> np.ndarray:
    """``C = X^T X / n`` over all ``n`` tokens of all samples, float64 ``[K, K]``."""
    return hessian(inputs, in_features) / 2.0  # gptq's hessian is 2/n X^T X


def whitening(c: np.ndarray, damp: float) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``C + damp * mean(diag C) * I`` (float64). When that is not
    positive definite (dead inputs, fewer tokens than inputs with ``damp=0``), ``damp`` grows tenfold
    from at least ``MIN_RETRY_DAMP``, up to ``DAMP_RETRIES`` times, as in GPTQ."""
    import torch
    c = torch.from_numpy(np.asarray(c, np.float64))
    eye = torch.eye(len(c), dtype=c.dtype)
    mean_diagonal = float(c.diagonal().mean()) or 1.0
    for retry in range(DAMP_RETRIES + 1):
        fraction = damp if retry == 0 else max(damp, MIN_RETRY_DAMP) * 10 ** retry
        with one_thread():
            lower, info = torch.linalg.cholesky_ex(c + fraction * mean_diagonal * eye)
        if info == 0:
            return lower.numpy()
    raise ValueError(f"the inputs' second moment is not positive definite even with damp={fraction}")


def whitened_singular_values(w: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Singular values of ``W L``, descending: ``s_i^2`` is what dropping direction ``i`` adds to
    the layer's mean squared output error (summed over outputs)."""
    return singular_values(np.asarray(w, np.float64) @ lower)


def whitened_svd(w: np.ndarray, lower: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)``: ``A = U_r S_r`` ``[N, r]``, ``B = V_r^T L^-1`` ``[r, K]`` from ``W L = U S V^T``, float32."""
    import torch
    u, s, vh = _svd(np.asarray(w, np.float64) @ lower)
    # B^T = L^-T V_r: solve L^T B^T = V_r (upper triangular)
    with one_thread():
        v_r = torch.from_numpy(np.ascontiguousarray(vh[:rank].T))
        b_t = torch.linalg.solve_triangular(torch.from_numpy(lower).T, v_r, upper=True).numpy()
    return (u[:, :rank] * s[:rank]).astype(np.float32), np.ascontiguousarray(b_t.T, np.float32)
