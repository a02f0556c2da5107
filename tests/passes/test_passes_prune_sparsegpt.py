"""prune-sparsegpt: matches a textbook float64 OBS loop (explicit inverses, no Cholesky), keeps the exact
pattern with less output error than Wanda and magnitude, handles dead inputs, and huge damping is
magnitude pruning."""

import functools

import numpy as np
import pytest

from llmopt.passes.prune import Level, PruneMagnitude, PruneSparseGPT, PruneWanda, sparsegpt
from llmopt.passes.quant.gptq import hessian
from prune_data import CALIBRATION, K, N, WEIGHT, output_error


@functools.lru_cache(maxsize=2)
def trailing_inverse_rows(damp: float) -> list[np.ndarray]:
    """Row 0 of ``(H[j:, j:])^-1`` for every ``j``, ``H = 2/n X^T X + damp * mean(diag H) * I`` in
    float64 of the inputs ``CALIBRATION``."""
    x = np.concatenate(CALIBRATION).reshape(-1, K).astype(np.float64)
    h = 2 / len(x) * x.T @ x
    h += damp * np.mean(np.diag(h)) * np.eye(K)
    return [np.linalg.solve(h[j:, j:], np.eye(K - j)[0]) for j in range(K)]  # H symmetric: row 0 = column 0


def textbook_sparsegpt(w: np.ndarray, level: Level, block: int, damp: float = 0.01,
                       mask: np.ndarray | None = None) -> np.ndarray:
    """Float64 OBS on the inputs ``CALIBRATION``, column by column, with the explicit inverse of the Hessian of the columns not
    visited yet (no Cholesky): column ``j``'s pruned weights become 0 and the columns after it move
    by ``-(w_j - q_j) / [H_F^-1]_00 * [H_F^-1]_0,:`` (``F = j..K-1``); the mask is chosen as each
    block (or group of M) starts, by ``w^2 / [H_F^-1]_00`` of each of its columns (or is ``mask``)."""
    inverse_rows = trailing_inverse_rows(damp)
    d = np.array([row[0] for row in inverse_rows])
    w = w.astype(np.float64).copy()
    keep = np.ones(w.shape, bool)
    for j in range(K):
        if mask is not None:
            keep[:, j] = mask[:, j]
        elif level.is_nm and j % level.m == 0:
            saliency = w[:, j:j + level.m] ** 2 / d[j:j + level.m]
            keep[:, j:j + level.m] = saliency >= np.sort(saliency, axis=1)[:, [level.m - level.n]]
        elif not level.is_nm and j % block == 0:
            end = min(j + block, K)
            saliency = w[:, j:end] ** 2 / d[j:end]
            count = int(level.sparsity * N * end) - int(level.sparsity * N * j)
            keep[:, j:end] = saliency > np.sort(saliency.reshape(-1))[count - 1]
        error = np.where(keep[:, j], 0, w[:, j])
        w[:, j:] -= np.outer(error / d[j], inverse_rows[j])
    return w


@pytest.mark.parametrize("level, block", [(Level(sparsity=0.5), 128), (Level(sparsity=0.3), 80),
                                          (Level(n=2, m=4), 128), (Level(n=4, m=8), 64)])
def test_sparsegpt_matches_a_textbook_obs_loop(level, block):
    """The same masks (float32 may flip a near-tie here and there, which then changes the rest of
    that row), and the same weights for the mask the pass chose."""
    got = PruneSparseGPT(block_size=block).prune_weight(WEIGHT, CALIBRATION, level)
    want = textbook_sparsegpt(WEIGHT, level, block)
    assert ((got != 0) == (np.abs(want) > 1e-9)).mean() > 0.99
    assert output_error(got) == pytest.approx(output_error(want.astype(np.float32)), rel=1e-2)
    same_mask = textbook_sparsegpt(WEIGHT, level, block, mask=got != 0)
    np.testing.assert_allclose(got, same_mask, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("level", [Level(sparsity=0.5), Level(sparsity=0.7), Level(n=2, m=4), Level(n=4, m=8)])
def test_sparsegpt_has_the_exact_pattern_and_least_output_error(level):
    sgpt = PruneSparseGPT().prune_weight(WEIGHT, CALIBRATION, level)
    wanda = PruneWanda().prune_weight(WEIGHT, CALIBRATION, level)
    magnitude = PruneMagnitude().prune_weight(WEIGHT, None, level)
    for pruned, per_row in ((sgpt, False), (wanda, True), (magnitude, False)):
        if level.is_nm:
            assert ((pruned.reshape(N, -1, level.m) != 0).sum(axis=-1) == level.n).all()
        elif per_row:
            assert ((pruned == 0).sum(axis=1) == int(level.sparsity * K)).all()
        else:
            assert (pruned == 0).sum() == int(level.sparsity * N * K)
    errors = {name: output_error(p) for name, p in (("sparsegpt", sgpt), ("wanda", wanda), ("magnitude", magnitude))}
    print(level, {name: round(e, 1) for name, e in errors.items()})
    assert errors["sparsegpt"] < 0.9 * errors["wanda"] and errors["wanda"] < errors["magnitude"]


def test_sparsegpt_prunes_dead_inputs_first_and_stays_finite():
    inputs = [np.array(sample) for sample in CALIBRATION]
    for sample in inputs:
        sample[..., :10] = 0
    pruned = sparsegpt(WEIGHT, hessian(inputs, K), Level(sparsity=0.5))
    assert np.isfinite(pruned).all() and (pruned[:, :10] == 0).all()
    assert (pruned == 0).sum() == N * K // 2


def test_huge_damping_is_magnitude_pruning_per_block():
    """With ``damp`` huge, ``H^-1`` is nearly a multiple of I: no updates, the block's mask is |w|."""
    pruned = sparsegpt(WEIGHT, hessian(CALIBRATION, K), Level(sparsity=0.5), block_size=K, damp=1e8)
    magnitude = PruneMagnitude(scope="layer").prune_weight(WEIGHT, None, Level(sparsity=0.5))
    np.testing.assert_array_equal(pruned != 0, magnitude != 0)
    np.testing.assert_allclose(pruned, magnitude, atol=1e-4)
